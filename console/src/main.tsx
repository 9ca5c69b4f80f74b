// The console's entry: adopt a #token= fragment, then show the login or the views.

import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { onUnauthorized } from "./api";
import { adoptTokenFromUrl, currentToken, forgetToken, isAdmin, readClaims } from "./auth";
import { useRoute } from "./hooks";
import "./styles.css";
import { later } from "./components/Later";
import { JobDetailView } from "./views/JobDetail";
import { JobsView } from "./views/Jobs";
import { LoginView } from "./views/Login";

// The views with charts load on first visit, so the Jobs view (the usual first one) does not wait for the
// charting library: it is most of the bundle.
const TenantsView = later(() => import("./views/Tenants").then((m) => m.TenantsView));
const PoolsView = later(() => import("./views/Pools").then((m) => m.PoolsView));
const CostView = later(() => import("./views/Cost").then((m) => m.CostView));

adoptTokenFromUrl();

const NAV = [
  ["jobs", "Jobs"],
  ["tenants", "Tenants and queues"],
  ["pools", "Pools"],
  ["cost", "Cost"],
] as const;

function App() {
  const [token, setToken] = useState(currentToken());
  const [message, setMessage] = useState("");
  const route = useRoute();

  useEffect(
    () =>
      onUnauthorized(() => {
        forgetToken();
        setToken(null);
        setMessage("The mesh refused the token (expired or not valid here). Sign in again.");
      }),
    [],
  );
  useEffect(() => {
    // A #token= link opened in a tab that already shows the console.
    const adopt = () => {
      if (adoptTokenFromUrl()) {
        setMessage("");
        setToken(currentToken());
      }
    };
    window.addEventListener("hashchange", adopt);
    return () => window.removeEventListener("hashchange", adopt);
  }, []);
  useEffect(() => {
    const claims = token ? readClaims(token) : null;
    if (claims?.expiresAt && claims.expiresAt * 1000 < Date.now()) {
      forgetToken();
      setToken(null);
      setMessage("The token has expired. Sign in with a new one.");
    }
  }, [token]);

  if (!token) {
    return (
      <LoginView
        message={message}
        onLogin={() => {
          setMessage("");
          setToken(currentToken());
          if (!window.location.hash.startsWith("#/")) window.location.hash = "/jobs";
        }}
      />
    );
  }

  const claims = readClaims(token);
  const tenant = claims?.tenant ?? "";
  const admin = isAdmin(claims);
  const [section = "jobs", id] = route.path;
  let view;
  if (section === "jobs" && id) view = <JobDetailView key={id} jobId={id} />;
  else if (section === "tenants") view = <TenantsView ownTenant={tenant} admin={admin} />;
  else if (section === "pools") view = <PoolsView />;
  else if (section === "cost") view = <CostView tenant={tenant} admin={admin} />;
  else view = <JobsView route={route} admin={admin} tenant={tenant} />;

  return (
    <>
      <a class="skip" href="#main" onClick={(e) => { e.preventDefault(); document.getElementById("main")?.focus(); }}>
        Skip to content
      </a>
      <header class="topbar">
        <span class="brand">jobmesh</span>
        <nav aria-label="Views">
          <ul>
            {NAV.map(([key, label]) => (
              <li key={key}>
                <a href={`#/${key}`} aria-current={section === key ? "page" : undefined}>
                  {label}
                </a>
              </li>
            ))}
          </ul>
        </nav>
        <span class="who">
          <span class="tag">{tenant}</span>
          {admin && <span class="tag tag-admin">admin</span>}
          <button
            type="button"
            class="link"
            onClick={() => {
              forgetToken();
              setToken(null);
              setMessage("Signed out.");
            }}
          >
            Sign out
          </button>
        </span>
      </header>
      <main id="main" tabIndex={-1}>
        {view}
      </main>
    </>
  );
}

render(<App />, document.getElementById("app") as HTMLElement);
