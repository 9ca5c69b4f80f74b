// The console's only way to the mesh: the public /api/v1 REST API, with the user's bearer token.

import { currentToken } from "./auth";
import type { Job } from "./types";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly reason: string,
    message: string,
  ) {
    super(message);
  }
}

type Listener = () => void;
const unauthorizedListeners = new Set<Listener>();

/** Called when the API answers 401: the token expired or is wrong, so the console shows the login again. */
export function onUnauthorized(listener: Listener): () => void {
  unauthorizedListeners.add(listener);
  return () => unauthorizedListeners.delete(listener);
}

function headers(extra?: HeadersInit): Headers {
  const h = new Headers(extra);
  const token = currentToken();
  if (token) h.set("Authorization", `Bearer ${token}`);
  return h;
}

async function errorFrom(resp: Response): Promise<ApiError> {
  let reason = "";
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = (await resp.json()) as { message?: string; details?: { reason?: string }[] };
    if (body.message) message = body.message;
    reason = body.details?.find((d) => d.reason)?.reason ?? "";
  } catch {
    // Not a google.rpc.Status body: keep the status line.
  }
  if (resp.status === 401) unauthorizedListeners.forEach((l) => l());
  return new ApiError(resp.status, reason, message);
}

async function send(method: string, path: string, body?: unknown, signal?: AbortSignal): Promise<Response> {
  const init: RequestInit = { method, headers: headers(), cache: "no-store", credentials: "omit", signal };
  if (body !== undefined) {
    (init.headers as Headers).set("Content-Type", "application/json");
    init.body = JSON.stringify(body);
  }
  return fetch(`/api/v1${path}`, init);
}

export async function getJson<T>(path: string, signal?: AbortSignal): Promise<T> {
  const resp = await send("GET", path, undefined, signal);
  if (!resp.ok) throw await errorFrom(resp);
  return (await resp.json()) as T;
}

export async function postJson<T>(path: string, body: unknown = {}): Promise<T> {
  const resp = await send("POST", path, body);
  if (!resp.ok) throw await errorFrom(resp);
  return (await resp.json()) as T;
}

export function query(params: Record<string, string | number | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== "") q.set(k, String(v));
  const s = q.toString();
  return s ? `?${s}` : "";
}

// Endpoints another release adds (watch, logs): asked once; a 404/405/501 means "not on this mesh yet" and
// the console falls back (polling for watch, a note for logs) for the rest of the session.
const missing = new Set<string>();

function absent(status: number): boolean {
  return status === 404 || status === 405 || status === 501;
}

export function featureMissing(name: "watch" | "logs"): boolean {
  return missing.has(name);
}

/**
 * Splits a streamed transcoder answer (a JSON array written piece by piece, or newline-delimited objects)
 * into its top-level objects as they complete.
 */
export class JsonObjectStream {
  private buffer = "";
  private depth = 0;
  private inString = false;
  private escaped = false;
  private start = -1;

  push(chunk: string): unknown[] {
    const out: unknown[] = [];
    const base = this.buffer.length;
    this.buffer += chunk;
    for (let i = base; i < this.buffer.length; i++) {
      const c = this.buffer[i];
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === "\\") this.escaped = true;
        else if (c === '"') this.inString = false;
      } else if (c === '"') {
        this.inString = true;
      } else if (c === "{") {
        if (this.depth === 0) this.start = i;
        this.depth++;
      } else if (c === "}") {
        this.depth--;
        if (this.depth === 0 && this.start >= 0) {
          out.push(JSON.parse(this.buffer.slice(this.start, i + 1)));
          this.start = -1;
        }
      }
    }
    if (this.depth === 0) this.buffer = "";
    else if (this.start > 0) {
      this.buffer = this.buffer.slice(this.start);
      this.start = 0;
    }
    return out;
  }
}

/**
 * Follows a job with `GET /api/v1/jobs/{id}:watch` when the mesh has it. Resolves to false at once when the
 * endpoint is missing (the caller polls instead), true when the stream ended normally.
 */
export async function watchJob(jobId: string, onJob: (job: Job) => void, signal: AbortSignal): Promise<boolean> {
  if (missing.has("watch")) return false;
  let resp: Response;
  try {
    resp = await send("GET", `/jobs/${encodeURIComponent(jobId)}:watch`, undefined, signal);
  } catch {
    return false;
  }
  if (!resp.ok || !resp.body) {
    if (absent(resp.status)) missing.add("watch");
    if (resp.status === 401) await errorFrom(resp);
    return false;
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new JsonObjectStream();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return true;
      for (const item of parser.push(value)) {
        const obj = item as { result?: Job } & Job;
        onJob(obj.result ?? obj);
      }
    }
  } catch {
    return false;
  }
}

export type LogsOutcome = "ended" | "unsupported" | "failed";

/** Streams a job's logs (`follow=true` while it runs) into onText; "unsupported" when the mesh lacks the API. */
export async function streamLogs(
  jobId: string,
  follow: boolean,
  onText: (text: string) => void,
  signal: AbortSignal,
): Promise<LogsOutcome> {
  if (missing.has("logs")) return "unsupported";
  let resp: Response;
  try {
    resp = await send("GET", `/jobs/${encodeURIComponent(jobId)}/logs${follow ? "?follow=true" : ""}`, undefined, signal);
  } catch {
    return "failed";
  }
  if (!resp.ok || !resp.body) {
    if (absent(resp.status)) {
      missing.add("logs");
      return "unsupported";
    }
    return "failed";
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return "ended";
      onText(value);
    }
  } catch {
    return signal.aborted ? "ended" : "failed";
  }
}
