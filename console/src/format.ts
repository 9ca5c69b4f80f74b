// Formatting for people: times, durations, money, states and reason codes.

import type { JobState, Money } from "./types";

export function stateLabel(state: JobState | string): string {
  const s = state.replace("JOB_STATE_", "");
  return s.charAt(0) + s.slice(1).toLowerCase();
}

export function stateClass(state: JobState | string): string {
  return `state state-${state.replace("JOB_STATE_", "").toLowerCase()}`;
}

export function parseTime(value?: string): number | null {
  if (!value) return null;
  const ms = Date.parse(value);
  return Number.isNaN(ms) || ms <= 0 ? null : ms;
}

const timeFormat = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "2-digit",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hour12: false,
});
const yearFormat = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "2-digit" });

export function formatTime(value?: string): string {
  const ms = parseTime(value);
  if (ms === null) return "—";
  // The year only when it is not this one.
  return new Date(ms).getFullYear() === new Date().getFullYear() ? timeFormat.format(ms) : yearFormat.format(ms);
}

export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  if (m < 60) return `${m} min ${s} s`;
  const h = Math.floor(m / 60);
  return `${h} h ${m % 60} min`;
}

export function between(from?: string, to?: string, now = Date.now()): number | null {
  const a = parseTime(from);
  if (a === null) return null;
  const b = parseTime(to) ?? now;
  return (b - a) / 1000;
}

export function moneyValue(m?: Money): number {
  if (!m) return 0;
  return Number(m.micros) / 1e6;
}

export function formatMoney(m?: Money, fallbackCurrency = ""): string {
  const currency = m?.currency || fallbackCurrency;
  const value = moneyValue(m);
  const digits = value !== 0 && Math.abs(value) < 0.01 ? 6 : 2;
  return `${value.toFixed(digits)}${currency ? ` ${currency}` : ""}`;
}

export function percent(fraction: number, digits = 0): string {
  if (!Number.isFinite(fraction)) return "—";
  return `${(fraction * 100).toFixed(digits)}%`;
}

export function cpu(millis?: number): string {
  const m = millis ?? 0;
  if (m > 0 && m < 100) return `${m} mCPU`;
  return `${(m / 1000).toFixed(m % 1000 ? 1 : 0)} CPU`;
}

export function memory(mb?: number): string {
  const v = mb ?? 0;
  return v >= 1024 ? `${(v / 1024).toFixed(v % 1024 ? 1 : 0)} GiB` : `${v} MiB`;
}

/** What the queueing service's waiting-reason codes mean (services/queueing/reasons.py). */
export const WAITING_REASONS: Record<string, string> = {
  QUEUED: "Waiting in its queue behind earlier jobs of the same tenant.",
  BEHIND_FAIR_SHARE: "Other tenants' jobs are ahead of it under weighted fair sharing.",
  WAITING_FOR_WORKER: "The scheduler offered it, but no worker has room for it right now.",
  POOL_SCALING_UP: "Its dynamic pool is adding workers for it.",
  RETRYING_AFTER_WORKER_LOST: "Its worker was lost; the job waits to run again as a new attempt.",
  RETRYING_AFTER_FAILURE: "An attempt failed and retries are left; the job waits to run again as a new attempt.",
  RETRYING_AFTER_INTERRUPTION: "Its worker was drained; the job waits to run again elsewhere as a new attempt.",
  BACKING_OFF: "An attempt failed; the next one starts no earlier than its next attempt time (retry backoff).",
  DEADLINE_MISSED: "Its deadline passed while it waited; it runs first among urgent jobs.",
};

export function explainWaiting(code: string): string {
  return WAITING_REASONS[code] ?? (code ? `Waiting: ${code}.` : "Waiting to be scheduled.");
}

export function humanize(code: string): string {
  if (!code) return "—";
  return code.charAt(0) + code.slice(1).toLowerCase().replace(/_/g, " ");
}
