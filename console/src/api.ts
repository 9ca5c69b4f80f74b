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

/** How a streamed answer ended: normally, refused by the API (an error status), or broken (network, reset). */
export type StreamEnd = { kind: "ended" } | { kind: "refused"; error: ApiError } | { kind: "broken"; error: unknown };

/** A refusal that another try cannot change (not found, forbidden, bad request): show it and stop. */
export function isFinal(end: StreamEnd): boolean {
  if (end.kind !== "refused") return false;
  const s = end.error.status;
  return s >= 400 && s < 500 && s !== 408 && s !== 429;
}

/** Opens a streamed GET; an error status becomes a StreamEnd, with the API's reason when its body has one. */
async function openStream(path: string, signal: AbortSignal): Promise<ReadableStreamDefaultReader<Uint8Array> | StreamEnd> {
  let resp: Response;
  try {
    resp = await send("GET", path, undefined, signal);
  } catch (error) {
    return { kind: "broken", error };
  }
  if (!resp.ok) return { kind: "refused", error: await errorFrom(resp) };
  if (!resp.body) return { kind: "broken", error: new Error("the answer has no body") };
  return resp.body.getReader();
}

async function readAll(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  onChunk: (chunk: Uint8Array) => StreamEnd | void,
): Promise<StreamEnd> {
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return { kind: "ended" };
      const end = onChunk(value);
      if (end) {
        await reader.cancel();
        return end;
      }
    }
  } catch (error) {
    return { kind: "broken", error };
  }
}

interface StatusBody {
  code?: number;
  message?: string;
  details?: { reason?: string }[];
}

/**
 * Follows a job with `GET /api/v1/jobs/{id}:watch` (newline-delimited JSON, one Job per line): the job now, then
 * at each change, until it ends. An error the server sends after the stream began arrives as a Status object.
 */
export async function watchJob(jobId: string, onJob: (job: Job) => void, signal: AbortSignal): Promise<StreamEnd> {
  const reader = await openStream(`/jobs/${encodeURIComponent(jobId)}:watch`, signal);
  if ("kind" in reader) return reader;
  const decoder = new TextDecoder();
  const parser = new JsonObjectStream();
  return readAll(reader, (chunk) => {
    for (const item of parser.push(decoder.decode(chunk, { stream: true }))) {
      const obj = item as { result?: Job; error?: StatusBody } & Job & StatusBody;
      const status = obj.error ?? (obj.job_id === undefined && obj.code !== undefined ? obj : null);
      if (status) {
        const reason = status.details?.find((d) => d.reason)?.reason ?? "";
        return { kind: "refused", error: new ApiError(500, reason, status.message ?? "the watch stream failed") };
      }
      onJob(obj.result ?? obj);
    }
    return undefined;
  });
}

/**
 * Reads a job's output (`GET /api/v1/jobs/{id}/logs?follow=true`): what is stored, then more as the job writes,
 * until the job ended and all of it was sent. `attempt` 0 is the latest (a follower goes on to a retry's attempt).
 * `onText` gets the text as written and the number of bytes it came in.
 */
export async function streamLogs(
  jobId: string,
  attempt: number,
  onText: (text: string, bytes: number) => void,
  signal: AbortSignal,
): Promise<StreamEnd> {
  const q = query({ follow: "true", attempt: attempt || undefined });
  const reader = await openStream(`/jobs/${encodeURIComponent(jobId)}/logs${q}`, signal);
  if ("kind" in reader) return reader;
  const decoder = new TextDecoder();
  const end = await readAll(reader, (chunk) => onText(decoder.decode(chunk, { stream: true }), chunk.byteLength));
  const rest = decoder.decode();
  if (rest) onText(rest, 0);
  return end;
}
