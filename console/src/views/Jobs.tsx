// Jobs: the tenant's jobs with state and name filters, newest-first live tail or server pages, bulk cancel.

import { useState } from "preact/hooks";
import { postJson } from "../api";
import { ErrorNote, Note } from "../components/Status";
import { between, cpu, formatDuration, formatTime, memory, stateClass, stateLabel } from "../format";
import { navigate, usePolling, type Route } from "../hooks";
import { listPage, newestJobs, scanByName } from "../jobsource";
import { TERMINAL_STATES, type Job } from "../types";

const STATES = ["", "JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"];
const PAGE_SIZES = [25, 50, 100];
const POLL_MS = 2000;

type Order = "newest" | "oldest";

function hashFor(order: Order, state: string, name: string): string {
  const q = new URLSearchParams();
  if (order !== "newest") q.set("order", order);
  if (state) q.set("state", state);
  if (name) q.set("name", name);
  const s = q.toString();
  return `/jobs${s ? `?${s}` : ""}`;
}

function cancellable(job: Job): boolean {
  return !TERMINAL_STATES.has(job.state);
}

function whereText(job: Job): string {
  if (job.state === "JOB_STATE_PENDING") {
    return job.queue_position ? `#${job.queue_position} in ${job.queue || "queue"}` : job.queue || "queued";
  }
  return job.worker_id ? `${job.pool_id} / ${job.worker_id}` : job.pool_id || "—";
}

export function JobsView({ route, admin, tenant }: { route: Route; admin: boolean; tenant: string }) {
  const order: Order = route.params.get("order") === "oldest" ? "oldest" : "newest";
  const state = route.params.get("state") ?? "";
  const name = route.params.get("name") ?? "";
  const [pageSize, setPageSize] = useState(50);
  const [tokens, setTokens] = useState<string[]>([""]); // oldest-first pages: the token of each page seen
  const [index, setIndex] = useState(0);
  const [shown, setShown] = useState(0); // newest-first: offset into the loaded newest jobs
  const [jobs, setJobs] = useState<Job[] | null>(null);
  const [next, setNext] = useState("");
  const [scanNote, setScanNote] = useState("");
  const [error, setError] = useState<unknown>(null);
  const [updated, setUpdated] = useState<number | null>(null);
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [confirming, setConfirming] = useState(false);
  const [outcome, setOutcome] = useState("");
  const [nameDraft, setNameDraft] = useState(name);
  const [openId, setOpenId] = useState("");
  const [reading, setReading] = useState(0); // jobs read while looking for the newest

  const key = `${order}|${state}|${name}|${pageSize}|${index}|${tokens[index]}`;
  usePolling(
    async (signal) => {
      try {
        const token = tokens[index] ?? "";
        if (order === "newest") {
          const named = (all: Job[]) => (name ? all.filter((j) => j.spec?.name?.toLowerCase().includes(name.toLowerCase())) : all);
          const r = await newestJobs(state, name ? 1000 : shown + pageSize, signal, setReading);
          setReading(0);
          setJobs(named(r.jobs));
          setNext("");
          setScanNote(name ? `Name filter over the newest ${r.jobs.length} jobs.` : "");
        } else if (name) {
          const r = await scanByName(state, name, pageSize, token, signal);
          setJobs(r.jobs);
          setNext(r.next);
          setScanNote(`${r.jobs.length} matching of ${r.scanned} jobs read from this point (the API has no name filter).`);
        } else {
          const r = await listPage(state, pageSize, token, signal);
          setJobs(r.jobs);
          setNext(r.next_page_token);
          setScanNote("");
        }
        setError(null);
        setUpdated(Date.now());
      } catch (e) {
        if (!signal.aborted) setError(e);
      }
    },
    POLL_MS,
    [key],
  );

  const resetPaging = () => {
    setTokens([""]);
    setIndex(0);
    setShown(0);
    setSelected(new Set());
    setJobs(null);
  };
  const go = (o: Order, s: string, n: string) => {
    resetPaging();
    navigate(hashFor(o, s, n));
  };

  const visible = order === "newest" ? (jobs ?? []).slice(shown, shown + pageSize) : (jobs ?? []);
  const visibleCancellable = visible.filter(cancellable);
  const allChecked = visibleCancellable.length > 0 && visibleCancellable.every((j) => selected.has(j.job_id));

  const toggle = (id: string) => {
    const s = new Set(selected);
    if (s.has(id)) s.delete(id);
    else s.add(id);
    setSelected(s);
    setConfirming(false);
  };
  const toggleAll = () => {
    const s = new Set(selected);
    for (const j of visibleCancellable) {
      if (allChecked) s.delete(j.job_id);
      else s.add(j.job_id);
    }
    setSelected(s);
    setConfirming(false);
  };

  const cancelSelected = async () => {
    const ids = [...selected];
    setConfirming(false);
    setOutcome(`Cancelling ${ids.length}…`);
    const failures: string[] = [];
    // A few at a time: the gateway answers each cancel separately.
    for (let i = 0; i < ids.length; i += 8) {
      const batch = ids.slice(i, i + 8);
      const results = await Promise.allSettled(batch.map((id) => postJson<Job>(`/jobs/${encodeURIComponent(id)}:cancel`)));
      results.forEach((r, k) => {
        if (r.status === "rejected") failures.push(`${batch[k]}: ${(r.reason as Error).message}`);
      });
    }
    setSelected(new Set());
    setOutcome(
      `Cancelled ${ids.length - failures.length} of ${ids.length} job${ids.length === 1 ? "" : "s"}.` +
        (failures.length ? ` Not cancelled: ${failures.join("; ")}` : ""),
    );
  };

  return (
    <div class="view">
      <div class="view-head">
        <h1>Jobs</h1>
        <p class="subtle">
          Tenant <strong>{tenant}</strong>
          {updated && (
            <span class="live" aria-live="off">
              {" "}
              · live, updated {new Date(updated).toLocaleTimeString()}
            </span>
          )}
        </p>
      </div>

      <form
        class="toolbar"
        role="search"
        aria-label="Filter jobs"
        onSubmit={(e) => {
          e.preventDefault();
          go(order, state, nameDraft.trim());
        }}
      >
        <div class="segmented" role="group" aria-label="Order">
          <button type="button" aria-pressed={order === "newest"} onClick={() => go("newest", state, name)}>
            Newest first (live)
          </button>
          <button type="button" aria-pressed={order === "oldest"} onClick={() => go("oldest", state, name)}>
            Oldest first (pages)
          </button>
        </div>
        <label>
          State
          <select value={state} onChange={(e) => go(order, (e.target as HTMLSelectElement).value, name)}>
            {STATES.map((s) => (
              <option key={s} value={s}>
                {s ? stateLabel(s) : "All states"}
              </option>
            ))}
          </select>
        </label>
        <label>
          Name contains
          <input type="search" value={nameDraft} onInput={(e) => setNameDraft((e.target as HTMLInputElement).value)} placeholder="e.g. nightly" />
        </label>
        <button type="submit">Filter</button>
        <label>
          Rows
          <select
            value={pageSize}
            onChange={(e) => {
              resetPaging();
              setPageSize(Number((e.target as HTMLSelectElement).value));
            }}
          >
            {PAGE_SIZES.map((n) => (
              <option key={n} value={n}>
                {n}
              </option>
            ))}
          </select>
        </label>
      </form>

      {admin && (
        <form
          class="toolbar toolbar-secondary"
          aria-label="Open any tenant's job"
          onSubmit={(e) => {
            e.preventDefault();
            if (openId.trim()) navigate(`/jobs/${encodeURIComponent(openId.trim())}`);
          }}
        >
          <label>
            Open a job of any tenant by id
            <input value={openId} onInput={(e) => setOpenId((e.target as HTMLInputElement).value)} class="mono" size={26} />
          </label>
          <button type="submit">Open</button>
          <span class="subtle">The list shows your token's tenant: the API lists only the caller's own jobs.</span>
        </form>
      )}

      <ErrorNote error={error} />
      {scanNote && <Note>{scanNote}</Note>}

      <div class="bulk" aria-live="polite">
        {selected.size > 0 && !confirming && (
          <button type="button" class="danger" onClick={() => setConfirming(true)}>
            Cancel selected ({selected.size})
          </button>
        )}
        {confirming && (
          <span class="confirm" role="group" aria-label="Confirm cancel">
            Cancel {selected.size} job{selected.size === 1 ? "" : "s"}? Running ones are stopped.
            <button type="button" class="danger" onClick={cancelSelected}>
              Yes, cancel
            </button>
            <button type="button" onClick={() => setConfirming(false)}>
              Keep them
            </button>
          </span>
        )}
        {outcome && <span class="outcome">{outcome}</span>}
      </div>

      <div class="table-wrap">
        <table class="jobs" aria-busy={jobs === null} data-testid="jobs-table">
          <caption class="sr-only">
            {order === "newest" ? "Newest jobs first" : "Jobs in submission order"}
            {state ? `, state ${stateLabel(state)}` : ""}
          </caption>
          <thead>
            <tr>
              <th scope="col" class="check">
                <input type="checkbox" aria-label="Select all cancellable jobs shown" checked={allChecked} disabled={!visibleCancellable.length} onChange={toggleAll} />
              </th>
              <th scope="col">Name</th>
              <th scope="col">State</th>
              <th scope="col">Queue position or worker</th>
              <th scope="col">Submitted</th>
              <th scope="col">Ran / waited</th>
              <th scope="col">Requests</th>
              <th scope="col">Job id</th>
            </tr>
          </thead>
          <tbody>
            {jobs === null && (
              <tr>
                <td colSpan={8} class="placeholder">
                  {reading > 500 ? `Finding the newest jobs: ${reading.toLocaleString()} read (the API lists oldest first)…` : "Loading jobs…"}
                </td>
              </tr>
            )}
            {jobs !== null && visible.length === 0 && (
              <tr>
                <td colSpan={8} class="placeholder">
                  No jobs {state ? `in state ${stateLabel(state)}` : ""} {name ? `named like “${name}”` : ""}
                </td>
              </tr>
            )}
            {visible.map((job) => (
              <tr key={job.job_id} data-job-id={job.job_id} data-state={job.state}>
                <td class="check">
                  <input
                    type="checkbox"
                    aria-label={`Select ${job.spec?.name || job.job_id}`}
                    checked={selected.has(job.job_id)}
                    disabled={!cancellable(job)}
                    onChange={() => toggle(job.job_id)}
                  />
                </td>
                <td>
                  <a href={`#/jobs/${encodeURIComponent(job.job_id)}`}>{job.spec?.name || "(unnamed)"}</a>
                </td>
                <td>
                  <span class={stateClass(job.state)}>{stateLabel(job.state)}</span>
                  {job.sla_miss && <span class="tag tag-warn" title="Started after its SLA target">SLA miss</span>}
                </td>
                <td class="where">{whereText(job)}</td>
                <td class="nowrap">{formatTime(job.create_time)}</td>
                <td>
                  {job.start_time
                    ? formatDuration(between(job.start_time, job.end_time) ?? 0)
                    : `waited ${formatDuration(between(job.create_time, job.end_time) ?? 0)}`}
                </td>
                <td class="small nowrap">
                  {cpu(job.spec?.resources?.cpu_millis)}, {memory(job.spec?.resources?.memory_mb)}
                </td>
                <td class="mono small">{job.job_id}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>

      <nav class="pager" aria-label="Pages">
        {order === "newest" ? (
          <>
            <button type="button" disabled={shown === 0} onClick={() => setShown(Math.max(0, shown - pageSize))}>
              ← Newer
            </button>
            <span>
              {jobs?.length ? `${shown + 1}–${Math.min(shown + pageSize, jobs.length)} of the newest ${jobs.length}` : ""}
            </span>
            <button type="button" disabled={!jobs || shown + pageSize >= jobs.length} onClick={() => setShown(shown + pageSize)}>
              Older →
            </button>
          </>
        ) : (
          <>
            <button type="button" disabled={index === 0} onClick={() => setIndex(index - 1)}>
              ← Previous
            </button>
            <span>Page {index + 1}</span>
            <button
              type="button"
              disabled={!next}
              onClick={() => {
                setTokens([...tokens.slice(0, index + 1), next]);
                setIndex(index + 1);
              }}
            >
              Next →
            </button>
          </>
        )}
      </nav>
    </div>
  );
}
