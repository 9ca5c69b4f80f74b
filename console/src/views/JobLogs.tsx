// A job's output in its detail view: as written, followed while the job runs, the page keeping its last 1 MiB.

import { useEffect, useLayoutEffect, useRef, useState } from "preact/hooks";
import { isFinal, streamLogs } from "../api";
import { ErrorNote } from "../components/Status";
import { backoffMs, LogBuffer, pause, type LogView } from "../live";
import { TERMINAL_STATES, type Job } from "../types";

export const MAX_SHOWN_CHARS = 1024 * 1024;
const TRIES = 5; // broken reads in a row before the panel gives up and offers a retry
const PAINT_MS = 150; // chunks arriving closer than this are drawn together

type Status = "following" | "reconnecting" | "ended" | "failed" | "refused";

function mib(bytes: number): string {
  return bytes >= 1024 * 1024 ? `${(bytes / 1024 / 1024).toFixed(1)} MiB` : `${Math.ceil(bytes / 1024)} KiB`;
}

function statusText(status: Status, log: LogView, job: Job | null, attempt: number): string {
  const empty = log.text === "";
  switch (status) {
    case "following":
      if (job && TERMINAL_STATES.has(job.state)) return empty ? "Reading…" : "Reading the rest of the output…";
      if (!empty) return "Following while it runs…";
      if (job?.state === "JOB_STATE_PENDING" && !job.attempt) return "No output yet: the job has not started. Following…";
      return "Following… no output yet.";
    case "reconnecting":
      return "The log stream broke; reading it again…";
    case "ended":
      if (empty) return attempt ? `Attempt ${attempt} wrote no output.` : "This job wrote no output.";
      return attempt ? `The whole output of attempt ${attempt}.` : "The whole output (the job has ended).";
    case "refused":
      return "The mesh refused to show this job's logs:";
    case "failed":
      return "Could not read the logs:";
  }
}

export function JobLogs({ jobId, job }: { jobId: string; job: Job | null }) {
  const [log, setLog] = useState<LogView>({ text: "", bytes: 0, trimmed: false });
  const [status, setStatus] = useState<Status>("following");
  const [error, setError] = useState<unknown>(null);
  const [attempt, setAttempt] = useState(0); // 0: the latest, followed on to a retry's attempt
  const [tries, setTries] = useState(0); // bumped by "Read again"
  const box = useRef<HTMLDivElement>(null);
  const atEnd = useRef(true); // keep showing the newest line unless the reader scrolled up

  useEffect(() => {
    const controller = new AbortController();
    const { signal } = controller;
    const buffer = new LogBuffer(MAX_SHOWN_CHARS);
    let timer: number | undefined;
    const paint = () => {
      window.clearTimeout(timer);
      timer = undefined;
      setLog(buffer.view());
    };
    const follow = async () => {
      setError(null);
      paint();
      // A read after a broken one starts from the beginning again: its first text replaces what was shown.
      let again = false;
      for (let failures = 0; !signal.aborted; ) {
        setStatus(failures ? "reconnecting" : "following");
        let read = false;
        const end = await streamLogs(
          jobId,
          attempt,
          (text, bytes) => {
            if (again && !read) buffer.clear();
            read = true;
            buffer.push(text, bytes);
            timer ??= window.setTimeout(paint, PAINT_MS);
          },
          signal,
        );
        if (signal.aborted) return;
        if (end.kind === "ended") {
          if (again && !read) buffer.clear();
          paint();
          setStatus("ended");
          return;
        }
        if (isFinal(end)) {
          buffer.clear(); // the API refused: show why, never an empty log
          paint();
          setError(end.kind === "refused" ? end.error : null);
          setStatus("refused");
          return;
        }
        again = true;
        failures = read ? 1 : failures + 1;
        if (failures >= TRIES) {
          paint();
          setError(end.kind === "refused" ? end.error : new Error("The log stream kept breaking."));
          setStatus("failed");
          return;
        }
        await pause(backoffMs(failures), signal);
      }
    };
    void follow();
    return () => {
      controller.abort();
      window.clearTimeout(timer);
    };
  }, [jobId, attempt, tries]);

  useLayoutEffect(() => {
    const el = box.current;
    if (el && atEnd.current) el.scrollTop = el.scrollHeight;
  }, [log]);

  const attempts = job?.attempt ?? 0;
  return (
    <div class="logs-panel">
      <div class="logs-bar">
        <p class="subtle" aria-live="polite" data-testid="logs-status">
          {statusText(status, log, job, attempt)}
          {log.trimmed && (
            <span data-testid="logs-trimmed">
              {" "}
              Showing the last {mib(MAX_SHOWN_CHARS)} of {mib(log.bytes)} read; the start is trimmed here (
              <code>jobmesh logs {jobId}</code> prints all of it).
            </span>
          )}
        </p>
        {attempts > 1 && (
          <label class="inline">
            Attempt
            <select value={attempt} onChange={(e) => setAttempt(Number((e.target as HTMLSelectElement).value))}>
              <option value={0}>latest, following retries</option>
              {Array.from({ length: attempts }, (_, i) => (
                <option key={i + 1} value={i + 1}>
                  {i + 1}
                </option>
              ))}
            </select>
          </label>
        )}
      </div>
      {error !== null && (
        <div data-testid="logs-error">
          <ErrorNote error={error} />
          {status === "failed" && (
            <button type="button" onClick={() => setTries((n) => n + 1)}>
              Read again
            </button>
          )}
        </div>
      )}
      {status !== "refused" && !(status === "ended" && log.text === "") && (
        <div
          ref={box}
          class="logs"
          role="region"
          aria-label={`Output of job ${job?.spec?.name || jobId}`}
          tabIndex={0}
          data-testid="job-logs"
          onScroll={(e) => {
            const el = e.currentTarget as HTMLDivElement;
            atEnd.current = el.scrollTop + el.clientHeight >= el.scrollHeight - 8;
          }}
        >
          <pre>{log.text}</pre>
        </div>
      )}
    </div>
  );
}
