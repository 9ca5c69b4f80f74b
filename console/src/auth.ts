// The user's token: taken from `#token=` or the login form, kept in sessionStorage only, never logged.

const STORAGE_KEY = "jobmesh.console.token";

export interface Claims {
  tenant: string;
  subject: string;
  roles: string[];
  expiresAt: number | null; // epoch seconds
}

/** Moves a `#token=<jwt>` fragment into sessionStorage and strips it from the address bar and history. */
export function adoptTokenFromUrl(): boolean {
  const match = /(?:^#|[#&/?])token=([^&]+)/.exec(window.location.hash);
  if (!match) return false;
  saveToken(decodeURIComponent(match[1]));
  history.replaceState(null, "", `${window.location.pathname}${window.location.search}#/jobs`);
  window.dispatchEvent(new HashChangeEvent("hashchange"));
  return true;
}

export function saveToken(token: string): void {
  sessionStorage.setItem(STORAGE_KEY, token.trim());
}

export function currentToken(): string | null {
  return sessionStorage.getItem(STORAGE_KEY);
}

export function forgetToken(): void {
  sessionStorage.removeItem(STORAGE_KEY);
}

function base64UrlDecode(part: string): string {
  const padded = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
  const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
}

/**
 * The token's claims, read for display (which tenant, admin or not, when it expires). The console does not
 * verify the signature: the gateway does, on every call, and the server's answers are what count.
 */
export function readClaims(token: string): Claims | null {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const body = JSON.parse(base64UrlDecode(parts[1])) as Record<string, unknown>;
    const roles = Array.isArray(body.roles) ? body.roles.filter((r): r is string => typeof r === "string") : [];
    return {
      tenant: typeof body.tenant === "string" ? body.tenant : "",
      subject: typeof body.sub === "string" ? body.sub : "",
      roles,
      expiresAt: typeof body.exp === "number" ? body.exp : null,
    };
  } catch {
    return null;
  }
}

export function isAdmin(claims: Claims | null): boolean {
  return claims?.roles.includes("admin") ?? false;
}
