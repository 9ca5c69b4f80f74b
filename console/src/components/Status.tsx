// Loading, error and empty states, and the small stat tiles the views share.

import type { ComponentChildren } from "preact";
import { ApiError } from "../api";

export function ErrorNote({ error }: { error: unknown }) {
  if (!error) return null;
  const text =
    error instanceof ApiError
      ? `${error.message}${error.reason ? ` (${error.reason})` : ""}`
      : error instanceof Error
        ? error.message
        : String(error);
  return (
    <p class="note note-error" role="alert">
      {text}
    </p>
  );
}

export function Note({ children }: { children: ComponentChildren }) {
  return <p class="note">{children}</p>;
}

export function Stat({ label, value, hint }: { label: string; value: ComponentChildren; hint?: string }) {
  return (
    <div class="stat">
      <dt>{label}</dt>
      <dd>{value}</dd>
      {hint && <dd class="stat-hint">{hint}</dd>}
    </div>
  );
}

export function Section({ title, children, id }: { title: string; children: ComponentChildren; id?: string }) {
  const headingId = `${id ?? title.replace(/\W+/g, "-").toLowerCase()}-h`;
  return (
    <section class="panel" aria-labelledby={headingId}>
      <h2 id={headingId}>{title}</h2>
      {children}
    </section>
  );
}
