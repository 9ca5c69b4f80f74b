// Cost: cost per day by pool, budget progress with its alert thresholds, idle cost, recommendations.

import { useState } from "preact/hooks";
import { getJson, query } from "../api";
import { ChartPanel } from "../components/Chart";
import { Meter } from "../components/Meter";
import { ErrorNote, Note, Section, Stat } from "../components/Status";
import { formatMoney, moneyValue, percent } from "../format";
import { usePolling } from "../hooks";
import type { Budget, CostReportsResponse, Money } from "../types";

const DAYS = 14;
// The all-tenants (admin) reports carry idle worker cost as one more row (services/cost/reports.py).
const IDLE_ROW = "__idle__";
const DAY_MS = 86_400_000;

function utcDay(ms: number): string {
  return new Date(ms).toISOString().slice(0, 10);
}

interface Daily {
  days: string[];
  pools: string[];
  cells: Record<string, Record<string, number>>; // day -> pool -> amount
  currency: string;
}

/** One report per UTC day (the reports give by-pool and by-day totals, not both at once), four at a time. */
async function dailyByPool(signal: AbortSignal): Promise<Daily> {
  const today = Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth(), new Date().getUTCDate());
  const starts = Array.from({ length: DAYS }, (_, i) => today - (DAYS - 1 - i) * DAY_MS);
  const cells: Daily["cells"] = {};
  const pools = new Set<string>();
  let currency = "";
  for (let i = 0; i < starts.length; i += 4) {
    const chunk = starts.slice(i, i + 4);
    const answers = await Promise.all(
      chunk.map((s) =>
        getJson<CostReportsResponse>(
          `/cost-optimization/reports${query({ start: new Date(s).toISOString(), end: new Date(s + DAY_MS).toISOString() })}`,
          signal,
        ),
      ),
    );
    answers.forEach((a, k) => {
      const day = utcDay(chunk[k]);
      const row: Record<string, number> = {};
      for (const r of a.reports) {
        for (const line of r.by_pool ?? []) {
          const key = r.tenant_id === IDLE_ROW ? `${line.key} (idle)` : line.key;
          row[key] = (row[key] ?? 0) + moneyValue(line.cost);
          pools.add(key);
          currency ||= line.cost?.currency ?? "";
        }
      }
      cells[day] = row;
    });
  }
  return { days: starts.map(utcDay), pools: [...pools].sort(), cells, currency };
}

export function CostView({ tenant, admin }: { tenant: string; admin: boolean }) {
  const [daily, setDaily] = useState<Daily | null>(null);
  const [month, setMonth] = useState<CostReportsResponse | null>(null);
  const [budget, setBudget] = useState<Budget | null>(null);
  const [error, setError] = useState<unknown>(null);

  usePolling(
    async (signal) => {
      try {
        const [d, m, b] = await Promise.all([
          dailyByPool(signal),
          getJson<CostReportsResponse>("/cost-optimization/reports", signal),
          getJson<Budget>(`/tenants/${encodeURIComponent(tenant)}/budget`, signal).catch(() => null),
        ]);
        setDaily(d);
        setMonth(m);
        setBudget(b);
        setError(null);
      } catch (e) {
        if (!signal.aborted) setError(e);
      }
    },
    30_000,
    [tenant],
  );

  const currency = daily?.currency || month?.reports[0]?.total?.currency || "";
  const tenants = (month?.reports ?? []).filter((r) => r.tenant_id !== IDLE_ROW);
  const total = tenants.reduce((s, r) => s + moneyValue(r.total), 0);
  const burst = tenants.reduce((s, r) => s + moneyValue(r.burst_spend), 0);
  const jobs = tenants.reduce((s, r) => s + (r.jobs || 0), 0);
  const idle = moneyValue(month?.idle_cost);
  const recs = (month?.reports ?? []).flatMap((r) =>
    (r.recommendations ?? []).map((x) => ({ ...x, tenant: r.tenant_id === IDLE_ROW ? "idle capacity" : r.tenant_id })),
  );
  const asMoney = (v: number): Money => ({ currency, micros: Math.round(v * 1e6), amount: v.toFixed(6) });
  const limit = moneyValue(budget?.monthly_limit);
  const spent = moneyValue(budget?.spent_this_month);

  return (
    <div class="view">
      <div class="view-head">
        <h1>Cost</h1>
        <p class="subtle">{admin ? "All tenants (admin)" : `Tenant ${tenant}`} · from the cost service's reports</p>
      </div>
      <ErrorNote error={error} />
      <dl class="stats stats-wide">
        <Stat
          label={admin ? "Charged to tenants, 30 days" : "Last 30 days"}
          value={month ? formatMoney(asMoney(total)) : "…"}
          hint={`${jobs} jobs charged${admin ? `; with idle, the mesh cost ${formatMoney(asMoney(total + idle))}` : ""}`}
        />
        <Stat label="Burst spend" value={month ? formatMoney(asMoney(burst)) : "…"} hint="included in the total" />
        <Stat
          label="Idle cost"
          value={admin ? formatMoney(asMoney(idle)) : "admins only"}
          hint="Worker time no job used, per pool; not charged to tenants"
        />
      </dl>
      <ChartPanel
        kind="bar"
        stacked
        title={`Cost per day by pool, last ${DAYS} days (UTC)${admin ? ", with idle worker cost per pool" : ""}`}
        testId="cost-chart"
        labels={daily?.days ?? []}
        yLabel={currency}
        format={(v) => (v < 0.01 && v > 0 ? v.toFixed(6) : v.toFixed(2))}
        series={(daily?.pools ?? []).map((p) => ({ label: p, values: (daily?.days ?? []).map((d) => daily?.cells[d]?.[p] ?? 0) }))}
      />
      <div class="grid-2">
        <Section title={`Monthly budget of ${tenant}`} id="budget">
          {budget && limit > 0 ? (
            <div data-testid="budget">
              <Meter
                label={`Spent this month (${budget.policy === "enforce" ? "enforced: submits stop at 100%" : "alerts only"})`}
                value={spent}
                max={limit}
                text={`${formatMoney(budget.spent_this_month)} of ${formatMoney(budget.monthly_limit)} (${percent(budget.utilization)})`}
                thresholds={[0.8, 1]}
              />
              <p class="subtle small">Alerts fire at 80% and 100% of the limit (the marks on the bar).</p>
            </div>
          ) : (
            <Note>{budget ? "No monthly budget set for this tenant." : "Budget not available."}</Note>
          )}
        </Section>
        <Section title="Recommendations" id="recommendations">
          {recs.length ? (
            <ul class="recs" data-testid="recommendations">
              {recs.map((r, i) => (
                <li key={i}>
                  <strong>{r.description}</strong>
                  <span class="subtle">
                    {" "}
                    — saves about {formatMoney(r.estimated_savings, currency)}
                    {admin ? ` · ${r.tenant}` : ""} · {r.kind}
                  </span>
                </li>
              ))}
            </ul>
          ) : (
            <Note>No recommendations for this period.</Note>
          )}
        </Section>
      </div>
    </div>
  );
}
