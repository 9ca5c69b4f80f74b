// Tenants and queues: quota usage, the active burst session, actual share over time, SLA compliance.

import { useState } from "preact/hooks";
import { getJson } from "../api";
import { ChartPanel } from "../components/Chart";
import { Meter } from "../components/Meter";
import { ErrorNote, Note, Section, Stat } from "../components/Status";
import { cpu, formatDuration, formatTime, memory, parseTime, percent } from "../format";
import { pushSample, useNow, usePolling } from "../hooks";
import { listPage, newestJobs } from "../jobsource";
import type { CostReportsResponse, Job, Pool, Quota } from "../types";

const SAMPLE_MS = 5000;

interface ShareSample {
  at: number;
  own: number; // the tenant's running jobs
  all: number; // running jobs on every pool
  cpu: number;
  memory: number;
  jobs: number;
}

async function countRunning(signal: AbortSignal): Promise<number> {
  let token = "";
  let count = 0;
  for (let i = 0; i < 10; i++) {
    const page = await listPage("JOB_STATE_RUNNING", 500, token, signal);
    count += page.jobs.length;
    token = page.next_page_token;
    if (!token) break;
  }
  return count;
}

function sla(jobs: Job[]): { started: number; met: number; missedPending: number } {
  let started = 0;
  let met = 0;
  let missedPending = 0;
  for (const j of jobs) {
    if (j.start_time && parseTime(j.start_time)) {
      started++;
      if (!j.sla_miss) met++;
    } else if (j.state === "JOB_STATE_PENDING" && j.sla_miss) missedPending++;
  }
  return { started, met, missedPending };
}

export function TenantsView({ ownTenant, admin }: { ownTenant: string; admin: boolean }) {
  const [tenant, setTenant] = useState(ownTenant);
  const [known, setKnown] = useState<string[]>([ownTenant]);
  const [quota, setQuota] = useState<Quota | null>(null);
  const [samples, setSamples] = useState<ShareSample[]>([]);
  const [slaInfo, setSlaInfo] = useState<ReturnType<typeof sla> | null>(null);
  const [error, setError] = useState<unknown>(null);
  const now = useNow(1000);
  const own = tenant === ownTenant;

  usePolling(
    async (signal) => {
      if (admin) {
        // The API has no tenant list; an admin's cost reports name every tenant that has spent.
        const r = await getJson<CostReportsResponse>("/cost-optimization/reports", signal).catch(() => null);
        if (r) setKnown([...new Set([ownTenant, ...r.reports.map((x) => x.tenant_id)])].sort());
      }
    },
    60_000,
    [admin, ownTenant],
  );

  usePolling(
    async (signal) => {
      try {
        const q = await getJson<Quota>(`/tenants/${encodeURIComponent(tenant)}/quotas`, signal);
        setQuota(q);
        setError(null);
        const u = q.utilization ?? {};
        let ownRunning = Number.NaN;
        let all = Number.NaN;
        if (own) {
          const [running, pools] = await Promise.all([countRunning(signal), getJson<{ pools: Pool[] }>("/pools", signal)]);
          ownRunning = running;
          all = pools.pools.reduce((s, p) => s + (p.running_jobs || 0), 0);
        }
        setSamples((s) =>
          pushSample(s, {
            at: Date.now(),
            own: ownRunning,
            all,
            cpu: u.cpu_millis ?? 0,
            memory: u.memory_mb ?? 0,
            jobs: u.concurrent_jobs ?? 0,
          }),
        );
      } catch (e) {
        if (!signal.aborted) setError(e);
      }
    },
    SAMPLE_MS,
    [tenant],
  );

  usePolling(
    async (signal) => {
      if (!own) {
        setSlaInfo(null);
        return;
      }
      const newest = await newestJobs("", 1000, signal);
      setSlaInfo(sla(newest.jobs));
    },
    30_000,
    [tenant, own],
  );

  const labels = samples.map((s) => new Date(s.at).toLocaleTimeString());
  const limits = quota?.limits ?? {};
  const usage = quota?.usage ?? {};
  const burst = quota?.burst?.session_id ? quota.burst : null;
  const burstLeft = burst ? ((parseTime(burst.expire_time) ?? now) - now) / 1000 : 0;
  const slaRate = slaInfo && slaInfo.started ? slaInfo.met / slaInfo.started : Number.NaN;

  return (
    <div class="view">
      <div class="view-head">
        <h1>Tenants and queues</h1>
        {admin ? (
          <label class="inline">
            Tenant
            <select value={tenant} onChange={(e) => { setSamples([]); setTenant((e.target as HTMLSelectElement).value); }}>
              {known.map((t) => (
                <option key={t} value={t}>
                  {t}
                </option>
              ))}
            </select>
          </label>
        ) : (
          <p class="subtle">
            Tenant <strong>{tenant}</strong>
          </p>
        )}
      </div>
      <ErrorNote error={error} />

      <div class="grid-2">
        <Section title="Quota usage" id="quota">
          {quota ? (
            <div data-testid="quota">
              <Meter label="CPU" value={usage.cpu_millis ?? 0} max={limits.cpu_millis ?? 0} text={`${cpu(usage.cpu_millis)} of ${cpu(limits.cpu_millis)}`} thresholds={[0.8]} />
              <Meter label="Memory" value={usage.memory_mb ?? 0} max={limits.memory_mb ?? 0} text={`${memory(usage.memory_mb)} of ${memory(limits.memory_mb)}`} thresholds={[0.8]} />
              <Meter
                label="Concurrent jobs"
                value={usage.concurrent_jobs ?? 0}
                max={limits.concurrent_jobs ?? 0}
                text={`${usage.concurrent_jobs ?? 0} of ${limits.concurrent_jobs ?? 0}`}
                thresholds={[0.8]}
              />
              <p class="subtle small">Usage counts the tenant's pending and running jobs (what admission reserves).</p>
            </div>
          ) : (
            <p>Loading…</p>
          )}
        </Section>
        <Section title="Burst session" id="burst">
          {burst ? (
            <dl class="stats" data-testid="burst">
              <Stat label="Time left" value={formatDuration(Math.max(0, burstLeft))} hint={`until ${formatTime(burst.expire_time)}`} />
              <Stat label="Extra CPU" value={cpu(burst.cpu_millis)} />
              <Stat label="Extra memory" value={memory(burst.memory_mb)} />
              <Stat label="Extra jobs" value={burst.concurrent_jobs} />
              <Stat label="Asked by" value={burst.requested_by || "—"} />
            </dl>
          ) : (
            <Note>No active burst session. Past sessions: {quota?.burst_sessions?.length ?? 0}.</Note>
          )}
          <h3>SLA compliance</h3>
          {own ? (
            slaInfo ? (
              <dl class="stats" data-testid="sla">
                <Stat label="Started within target" value={percent(slaRate, 1)} hint={`${slaInfo.met} of ${slaInfo.started} started jobs among the newest 500 to 1,000`} />
                <Stat label="Pending past target" value={slaInfo.missedPending} />
              </dl>
            ) : (
              <p>Loading…</p>
            )
          ) : (
            <Note>SLA compliance is computed from the tenant's job list, which only that tenant's token can read.</Note>
          )}
        </Section>
      </div>

      <Section title="Share of the mesh over time" id="share">
        <Note>
          Sampled every {SAMPLE_MS / 1000} s while this page is open (the API keeps no history of shares). Actual share is the
          tenant's running jobs over all running jobs on every pool. The public API does not expose fair-share weights (they
          are in the mesh configuration; admins change them with PUT /api/v1/tenants/{"{id}"}/fair-share), so no weight line is drawn.
        </Note>
        <div class="grid-2">
          <ChartPanel
            kind="line"
            title="Actual share of running jobs"
            testId="share-chart"
            labels={labels}
            yMax={1}
            format={(v) => percent(v)}
            series={[{ label: own ? `${tenant} share` : `${tenant} share (needs that tenant's token)`, values: samples.map((s) => (s.all > 0 ? s.own / s.all : own && s.all === 0 ? 0 : null)) }]}
          />
          <ChartPanel
            kind="line"
            title="Quota utilization"
            labels={labels}
            format={(v) => percent(v)}
            series={[
              { label: "CPU", values: samples.map((s) => s.cpu) },
              { label: "Memory", values: samples.map((s) => s.memory) },
              { label: "Concurrent jobs", values: samples.map((s) => s.jobs) },
            ]}
          />
        </div>
      </Section>
    </div>
  );
}
