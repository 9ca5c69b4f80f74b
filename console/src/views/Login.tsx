// The login: paste a token (it stays in this tab's sessionStorage), or open /console/#token=<jwt>.

import { useState } from "preact/hooks";
import { readClaims, saveToken } from "../auth";

export function LoginView({ onLogin, message }: { onLogin: () => void; message: string }) {
  const [token, setToken] = useState("");
  const [error, setError] = useState("");
  return (
    <main id="main" class="login">
      <form
        class="login-card"
        aria-labelledby="login-h"
        onSubmit={(e) => {
          e.preventDefault();
          const claims = readClaims(token.trim());
          if (!claims) {
            setError("That is not a JWT (three dot-separated parts).");
            return;
          }
          saveToken(token);
          onLogin();
        }}
      >
        <h1 id="login-h">jobmesh console</h1>
        <p>Sign in with an API token. It is kept in this tab only and sent only to this mesh's /api/v1.</p>
        {message && (
          <p class="note note-error" role="alert">
            {message}
          </p>
        )}
        <label for="token">API token (JWT)</label>
        <textarea id="token" rows={5} spellcheck={false} autoComplete="off" value={token} onInput={(e) => setToken((e.target as HTMLTextAreaElement).value)} aria-describedby="token-help" />
        <p id="token-help" class="subtle small">
          Get one with <code>.venv/bin/jobmesh token --tenant acme</code>, or open the link <code>make run</code> prints.
        </p>
        {error && (
          <p class="note note-error" role="alert">
            {error}
          </p>
        )}
        <button type="submit" class="primary">
          Sign in
        </button>
      </form>
    </main>
  );
}
