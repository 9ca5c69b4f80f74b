// Pools: workers by state, utilization and queue depth over time, provisioning, success rate, scaling history.

import { useState } from "preact/hooks";
import { getJson } from "../api";
import { ChartPanel } from "../components/Chart";
import { ErrorNote, Note, Section, Stat } from "../components/Status";
import { cpu, formatDuration, formatTime, humanize, memory, percent } from "../format";
import { pushSample, usePolling } from "../hooks";
import type { Pool, PoolMetrics, ScalingEvent } from "../types";

const SAMPLE_MS = 3000;

interface Sample {
  at: number;
  utilization: Record<string, number>;
  depth: Record<string, number>;
}

const KIND: Record<string, string> = {
  POOL_KIND_STATIC: "static",
  POOL_KIND_DYNAMIC: "dynamic",
  POOL_KIND_BURST: "burst",
};

function WorkersBar({ byState }: { byState: Record<string, number> }) {
  const entries = Object.entries(byState)
    .map(([s, n]) => [s.replace("WORKER_STATE_", ""), n] as const)
    .filter(([, n]) => n > 0);
  const total = entries.reduce((s, [, n]) => s + n, 0);
  if (!total) return <span class="subtle">no workers</span>;
  return (
    <div class="workers">
      <div class="stackbar" role="img" aria-label={entries.map(([s, n]) => `${n} ${s.toLowerCase()}`).join(", ")}>
        {entries.map(([s, n]) => (
          <span key={s} class={`seg seg-${s.toLowerCase()}`} style={{ flexGrow: n }} />
        ))}
      </div>
      <ul class="legend">
        {entries.map(([s, n]) => (
          <li key={s}>
            <span class={`dot seg-${s.toLowerCase()}`} aria-hidden="true" /> {n} {s.toLowerCase()}
          </li>
        ))}
      </ul>
    </div>
  );
}

export function PoolsView() {
  const [pools, setPools] = useState<Pool[]>([]);
  const [metrics, setMetrics] = useState<Record<string, PoolMetrics>>({});
  const [history, setHistory] = useState<Record<string, ScalingEvent[]>>({});
  const [samples, setSamples] = useState<Sample[]>([]);
  const [error, setError] = useState<unknown>(null);

  usePolling(
    async (signal) => {
      try {
        const list = await getJson<{ pools: Pool[] }>("/pools", signal);
        const ms = await Promise.all(list.pools.map((p) => getJson<PoolMetrics>(`/pools/${encodeURIComponent(p.pool_id)}/metrics`, signal)));
        const byId = Object.fromEntries(ms.map((m) => [m.pool_id, m]));
        setPools(list.pools);
        setMetrics(byId);
        setSamples((s) =>
          pushSample(s, {
            at: Date.now(),
            utilization: Object.fromEntries(ms.map((m) => [m.pool_id, m.utilization])),
            depth: Object.fromEntries(ms.map((m) => [m.pool_id, m.queue_depth])),
          }),
        );
        setError(null);
      } catch (e) {
        if (!signal.aborted) setError(e);
      }
    },
    SAMPLE_MS,
    [],
  );

  usePolling(
    async (signal) => {
      const ids = pools.map((p) => p.pool_id);
      const events = await Promise.all(
        ids.map((id) => getJson<{ events: ScalingEvent[] }>(`/pools/${encodeURIComponent(id)}/scaling/history?page_size=20`, signal)),
      );
      setHistory(Object.fromEntries(ids.map((id, i) => [id, events[i].events])));
    },
    10_000,
    [pools.map((p) => p.pool_id).join(",")],
  );

  const labels = samples.map((s) => new Date(s.at).toLocaleTimeString());
  const ids = pools.map((p) => p.pool_id);
  return (
    <div class="view">
      <div class="view-head">
        <h1>Pools</h1>
        <p class="subtle">{pools.length} pools · refreshed every {SAMPLE_MS / 1000} s</p>
      </div>
      <ErrorNote error={error} />
      <Note>Utilization and queue depth are sampled while this page is open; the API serves their current values, not their history.</Note>
      <div class="grid-2">
        <ChartPanel
          kind="line"
          title="Utilization"
          testId="utilization-chart"
          labels={labels}
          yMax={1}
          format={(v) => percent(v)}
          series={ids.map((id) => ({ label: id, values: samples.map((s) => s.utilization[id] ?? null) }))}
        />
        <ChartPanel
          kind="line"
          title="Queue depth (jobs waiting)"
          testId="depth-chart"
          labels={labels}
          integer
          format={(v) => String(Math.round(v))}
          series={ids.map((id) => ({ label: id, values: samples.map((s) => s.depth[id] ?? null) }))}
        />
      </div>
      <div class="pool-cards">
        {pools.map((p) => {
          const m = metrics[p.pool_id];
          const events = [...(history[p.pool_id] ?? [])].reverse(); // newest first
          return (
            <Section key={p.pool_id} title={p.pool_id} id={`pool-${p.pool_id}`}>
              <p class="subtle">
                <span class="tag">{KIND[p.kind] ?? p.kind}</span> {p.workers} workers
                {p.kind !== "POOL_KIND_STATIC" && ` (min ${p.min_workers}, max ${p.max_workers})`} · each {cpu(p.worker_size?.cpu_millis)},{" "}
                {memory(p.worker_size?.memory_mb)}
                {p.worker_slots > 1 && `, ${p.worker_slots} slots`}
              </p>
              <WorkersBar byState={m?.workers_by_state ?? {}} />
              <dl class="stats">
                <Stat label="Utilization" value={m ? percent(m.utilization) : "—"} />
                <Stat label="Running jobs" value={m?.running_jobs ?? "—"} />
                <Stat label="Queue depth" value={m?.queue_depth ?? "—"} hint={m?.oldest_wait_seconds ? `oldest waits ${formatDuration(m.oldest_wait_seconds)}` : undefined} />
                <Stat
                  label="Provisioning"
                  value={m && m.provisioning_seconds_p50 ? formatDuration(m.provisioning_seconds_p50) : "—"}
                  hint={m && m.provisioning_seconds_p95 ? `p50; p95 ${formatDuration(m.provisioning_seconds_p95)}` : "p50"}
                />
                <Stat
                  label="Success rate"
                  value={m && m.jobs_succeeded + m.jobs_failed > 0 ? percent(m.success_rate, 1) : "—"}
                  hint={m ? `${m.jobs_succeeded} succeeded, ${m.jobs_failed} failed` : undefined}
                />
              </dl>
              <h3>Scaling history (newest first)</h3>
              {events.length ? (
                <ol class="timeline scaling">
                  {events.map((e, i) => (
                    <li key={i} class={e.executed ? `tl-${e.direction.toLowerCase()}` : "tl-skipped"}>
                      <time dateTime={e.time}>{formatTime(e.time)}</time>
                      <strong>
                        {humanize(e.direction)} {e.from_workers} → {e.to_workers}
                      </strong>
                      {!e.executed && <span class="tag">not executed</span>}
                      <span class="subtle">
                        {" "}
                        — trigger {e.trigger || "—"}
                        {e.reason ? `: ${e.reason}` : ""}
                      </span>
                    </li>
                  ))}
                </ol>
              ) : (
                <p class="subtle">No scaling decisions recorded.</p>
              )}
            </Section>
          );
        })}
      </div>
    </div>
  );
}
