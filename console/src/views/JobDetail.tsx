// Job detail: state timeline, why it waits and where it is in its queue, attempts, cost, logs.

import { useEffect, useState } from "preact/hooks";
import { ApiError, getJson, isFinal, postJson, watchJob } from "../api";
import { ErrorNote, Note, Section, Stat } from "../components/Status";
import {
  between,
  cpu,
  explainWaiting,
  formatDuration,
  formatMoney,
  formatTime,
  humanize,
  memory,
  parseTime,
  stateClass,
  stateLabel,
} from "../format";
import { useNow } from "../hooks";
import { backoffMs, pause } from "../live";
import { TERMINAL_STATES, type Job } from "../types";
import { JobLogs } from "./JobLogs";

const WATCH_TRIES = 3; // broken watch streams in a row before the view falls back to polling
const POLL_MS = 3000;
const POLLS_BETWEEN_WATCHES = 10; // while polling, the stream is tried again every 30 s

type Live = "watch" | "reconnecting" | "poll" | "";

interface Event {
  time: string;
  title: string;
  detail?: string;
  kind: string;
}

function timeline(job: Job): Event[] {
  const events: Event[] = [];
  if (job.create_time) events.push({ time: job.create_time, title: "Submitted, pending", kind: "pending", detail: job.queue ? `queue ${job.queue}` : undefined });
  for (const a of job.attempts ?? []) {
    if (a.start_time) events.push({ time: a.start_time, title: `Attempt ${a.attempt} running`, kind: "running", detail: `worker ${a.worker_id} in ${a.pool_id}` });
    if (a.end_time) {
      events.push({
        time: a.end_time,
        title: `Attempt ${a.attempt} ended`,
        kind: a.exit_code === 0 && ["", "EXITED", "COMPLETED"].includes(a.reason) ? "succeeded" : "failed",
        detail: `${humanize(a.reason)}, exit code ${a.exit_code}`,
      });
    }
  }
  if (!job.attempts?.length && job.start_time) events.push({ time: job.start_time, title: "Running", kind: "running", detail: job.worker_id });
  if (TERMINAL_STATES.has(job.state) && job.end_time) {
    events.push({
      time: job.end_time,
      title: stateLabel(job.state),
      kind: job.state.replace("JOB_STATE_", "").toLowerCase(),
      detail: job.message && job.message !== job.reason ? `${humanize(job.reason)}: ${job.message}` : humanize(job.reason),
    });
  }
  return events.sort((x, y) => (parseTime(x.time) ?? 0) - (parseTime(y.time) ?? 0));
}

export function JobDetailView({ jobId }: { jobId: string }) {
  const [job, setJob] = useState<Job | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [live, setLive] = useState<Live>("");
  const [cancelState, setCancelState] = useState<"" | "confirm" | "sending">("");
  const [cancelError, setCancelError] = useState<unknown>(null);
  const now = useNow(1000);

  useEffect(() => {
    const controller = new AbortController();
    const { signal } = controller;
    let over = false; // the job ended, or the API refused it for good
    const seen = (j: Job) => {
      setJob(j);
      setError(null);
      if (TERMINAL_STATES.has(j.state)) over = true;
    };
    const refused = (e: unknown) => {
      setError(e);
      if (e instanceof ApiError && isFinal({ kind: "refused", error: e })) over = true;
    };
    // Light polling, only while the watch stream keeps failing; the stream is tried again now and then.
    const poll = async () => {
      for (let i = 0; i < POLLS_BETWEEN_WATCHES && !over && !signal.aborted; i++) {
        try {
          seen(await getJson<Job>(`/jobs/${encodeURIComponent(jobId)}`, signal));
        } catch (e) {
          if (!signal.aborted) refused(e);
        }
        if (!over) await pause(POLL_MS, signal);
      }
    };
    // The watch stream sends the job now and at each change, and closes once the job ended: no polling. A
    // stream that ends before the job did (a restart, a proxy's idle timeout) is opened again with backoff.
    const follow = async () => {
      let failures = 0;
      for (let round = 0; round < 100_000 && !over && !signal.aborted; round++) {
        setLive(failures ? "reconnecting" : "watch");
        let got = false;
        const end = await watchJob(jobId, (j) => { got = true; seen(j); }, signal);
        if (signal.aborted || over) break;
        if (end.kind === "refused" && isFinal(end)) {
          refused(end.error); // not found (another tenant's job), forbidden: shown, and nothing more to follow
          break;
        }
        failures = got ? 1 : failures + 1;
        if (failures < WATCH_TRIES) {
          await pause(backoffMs(failures), signal);
          continue;
        }
        setLive("poll");
        await poll();
        failures = WATCH_TRIES - 1; // one more try of the stream; polling again if it fails
      }
      if (!signal.aborted) setLive("");
    };
    void follow();
    return () => controller.abort();
  }, [jobId]);

  const cancel = async () => {
    setCancelState("sending");
    try {
      setJob(await postJson<Job>(`/jobs/${encodeURIComponent(jobId)}:cancel`));
      setCancelError(null);
    } catch (e) {
      setCancelError(e);
    }
    setCancelState("");
  };

  if (!job) {
    return (
      <div class="view">
        <p>
          <a href="#/jobs">← Jobs</a>
        </p>
        <h1>Job {jobId}</h1>
        {error ? <ErrorNote error={error} /> : <p>Loading…</p>}
        <Section key="logs" title="Logs" id="logs">
          <JobLogs jobId={jobId} job={null} />
        </Section>
      </div>
    );
  }

  const pending = job.state === "JOB_STATE_PENDING";
  const terminal = TERMINAL_STATES.has(job.state);
  const waited = between(job.create_time, job.start_time ?? job.end_time, now);
  const ran = job.start_time ? between(job.start_time, job.end_time, now) : null;
  return (
    <div class="view">
      <p>
        <a href="#/jobs">← Jobs</a>
      </p>
      <div class="view-head">
        <h1>
          {job.spec?.name || "(unnamed)"} <span class={stateClass(job.state)} data-testid="job-state">{stateLabel(job.state)}</span>
        </h1>
        <p class="subtle">
          <span class="mono">{job.job_id}</span> · tenant {job.tenant_id}
          {live && !terminal && (
            <span data-testid="live">
              {" "}
              · {live === "watch" ? "live (watch stream)" : live === "reconnecting" ? "the watch stream broke; reconnecting…" : "polling every 3 s (the watch stream keeps failing)"}
            </span>
          )}
        </p>
        {!terminal && (
          <div class="actions">
            {cancelState === "confirm" ? (
              <span class="confirm" role="group" aria-label="Confirm cancel">
                Cancel this job?
                <button type="button" class="danger" onClick={cancel}>
                  Yes, cancel
                </button>
                <button type="button" onClick={() => setCancelState("")}>
                  Keep it
                </button>
              </span>
            ) : (
              <button type="button" class="danger" disabled={cancelState === "sending"} onClick={() => setCancelState("confirm")}>
                Cancel job
              </button>
            )}
          </div>
        )}
      </div>
      <ErrorNote error={error} />
      <ErrorNote error={cancelError} />

      {pending && (
        <Section title="Why it waits" id="waiting">
          <dl class="stats">
            <Stat label="Reason" value={<span class="code" data-testid="waiting-reason">{job.waiting_reason || "—"}</span>} hint={explainWaiting(job.waiting_reason)} />
            <Stat
              label="Queue position"
              value={<span data-testid="queue-position">{job.queue_position ? `#${job.queue_position}` : "—"}</span>}
              hint={job.queue_position ? `${job.queue_position - 1} job${job.queue_position === 2 ? "" : "s"} ahead of it in ${job.queue || "its queue"}` : undefined}
            />
            <Stat label="Waiting for" value={formatDuration(waited ?? 0)} />
            {job.retries > 0 && <Stat label="Retries used" value={job.retries} />}
          </dl>
        </Section>
      )}

      <div class="grid-2">
        <Section title="Timeline" id="timeline">
          <ol class="timeline" data-testid="timeline">
            {timeline(job).map((e, i) => (
              <li key={i} class={`tl-${e.kind}`}>
                <time dateTime={e.time}>{formatTime(e.time)}</time>
                <strong>{e.title}</strong>
                {e.detail && <span class="subtle"> — {e.detail}</span>}
              </li>
            ))}
          </ol>
        </Section>
        <Section title="Summary" id="summary">
          <dl class="stats">
            <Stat label="Waited" value={formatDuration(waited ?? 0)} />
            <Stat label="Ran" value={ran === null ? "—" : formatDuration(ran)} />
            <Stat label="Cost so far" value={<span data-testid="job-cost">{job.cost?.total ? formatMoney(job.cost.total) : "—"}</span>} hint="Charged per ended attempt" />
            <Stat label="Exit code" value={terminal && job.attempt ? job.exit_code : "—"} hint={job.reason ? humanize(job.reason) : undefined} />
            <Stat label="Requests" value={`${cpu(job.spec?.resources?.cpu_millis)}, ${memory(job.spec?.resources?.memory_mb)}`} />
            <Stat label="SLA" value={job.sla_miss ? "Missed" : job.start_time ? "Met" : "Met so far"} hint={job.spec?.sla_tier ? `tier ${job.spec.sla_tier}` : "default tier"} />
          </dl>
          <p class="mono small command" title="Command">
            $ {(job.spec?.command ?? []).join(" ")}
          </p>
        </Section>
      </div>

      <Section title="Attempts" id="attempts">
        {job.attempts?.length ? (
          <div class="table-wrap">
            <table>
              <thead>
                <tr>
                  <th scope="col">#</th>
                  <th scope="col">Worker</th>
                  <th scope="col">Pool</th>
                  <th scope="col">Started</th>
                  <th scope="col">Ran</th>
                  <th scope="col">Exit code</th>
                  <th scope="col">Reason</th>
                  <th scope="col" class="num">CPU s</th>
                  <th scope="col" class="num">Max memory</th>
                  <th scope="col" class="num">Cost</th>
                </tr>
              </thead>
              <tbody>
                {job.attempts.map((a) => {
                  const cost = job.cost?.attempts?.find((c) => c.attempt === a.attempt);
                  return (
                    <tr key={a.attempt}>
                      <td>{a.attempt}</td>
                      <td class="mono small">{a.worker_id}</td>
                      <td>{a.pool_id}</td>
                      <td>{formatTime(a.start_time)}</td>
                      <td>{formatDuration(between(a.start_time, a.end_time, now) ?? 0)}</td>
                      <td>{a.end_time ? a.exit_code : "running"}</td>
                      <td>{a.end_time ? humanize(a.reason) : "—"}</td>
                      <td class="num">{a.cpu_seconds ? a.cpu_seconds.toFixed(2) : "—"}</td>
                      <td class="num">{a.max_memory_mb ? memory(a.max_memory_mb) : "—"}</td>
                      <td class="num">{cost?.cost ? `${formatMoney(cost.cost)}${cost.burst ? " (burst)" : ""}` : a.end_time ? "pending" : "when it ends"}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
          </div>
        ) : (
          <Note>No attempt yet: the job has not been dispatched to a worker.</Note>
        )}
      </Section>

      <Section key="logs" title="Logs" id="logs">
        <JobLogs jobId={jobId} job={job} />
      </Section>
    </div>
  );
}
