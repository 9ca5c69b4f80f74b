// A Chart.js chart with an accessible name and its numbers as a table for screen readers and keyboards.

import {
  BarController,
  BarElement,
  CategoryScale,
  Chart,
  type ChartConfiguration,
  Filler,
  Legend,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
} from "chart.js";
import { useEffect, useRef } from "preact/hooks";

Chart.register(BarController, BarElement, CategoryScale, Filler, Legend, LinearScale, LineController, LineElement, PointElement, Tooltip);
Chart.defaults.font.family = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
Chart.defaults.color = "#3b4250";
Chart.defaults.animation = false;

// Distinguishable, and dark enough to read on white (WCAG 3:1 for graphics).
export const PALETTE = ["#1f4e8c", "#b3541e", "#2e7d32", "#7b3fa0", "#c62828", "#00796b", "#5d4037", "#ad1457"];

export interface Series {
  label: string;
  values: (number | null)[];
  dashed?: boolean;
}

interface Props {
  kind: "line" | "bar";
  title: string;
  labels: string[];
  series: Series[];
  stacked?: boolean;
  yLabel?: string;
  yMax?: number;
  format?: (v: number) => string;
  testId?: string;
  integer?: boolean;
}

export function ChartPanel({ kind, title, labels, series, stacked, yLabel, yMax, format, testId, integer }: Props) {
  const canvas = useRef<HTMLCanvasElement>(null);
  const chart = useRef<Chart | null>(null);
  const fmt = format ?? ((v: number) => String(Math.round(v * 1000) / 1000));

  useEffect(() => {
    if (!canvas.current) return undefined;
    const config: ChartConfiguration = {
      type: kind,
      data: { labels: [], datasets: [] },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { position: "bottom", labels: { boxWidth: 12 } },
          tooltip: { callbacks: { label: (ctx) => `${ctx.dataset.label}: ${fmt(Number(ctx.parsed.y))}` } },
        },
        scales: {
          x: { stacked, grid: { display: false }, ticks: { maxRotation: 0, autoSkip: true, maxTicksLimit: 8 } },
          y: {
            stacked,
            beginAtZero: true,
            max: yMax,
            title: { display: Boolean(yLabel), text: yLabel ?? "" },
            ticks: { callback: (v) => fmt(Number(v)), precision: integer ? 0 : undefined },
            suggestedMax: integer ? 4 : undefined,
          },
        },
      },
    };
    chart.current = new Chart(canvas.current, config);
    return () => {
      chart.current?.destroy();
      chart.current = null;
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [kind, stacked, yMax, yLabel, integer]);

  useEffect(() => {
    const c = chart.current;
    if (!c) return;
    c.data.labels = labels;
    c.data.datasets = series.map((s, i) => ({
      label: s.label,
      data: s.values,
      borderColor: PALETTE[i % PALETTE.length],
      backgroundColor: kind === "bar" ? PALETTE[i % PALETTE.length] : `${PALETTE[i % PALETTE.length]}22`,
      borderDash: s.dashed ? [6, 4] : undefined,
      borderWidth: 2,
      pointRadius: kind === "line" && labels.length < 3 ? 3 : 0,
      tension: 0.2,
      spanGaps: true,
    }));
    c.update("none");
  }, [labels, series, kind]);

  const empty = labels.length === 0 || series.length === 0;
  return (
    <figure class="chart" data-testid={testId} data-points={labels.length}>
      <figcaption>{title}</figcaption>
      <div class="chart-canvas">
        <canvas ref={canvas} role="img" aria-label={`${title} (chart; the numbers are in the table below it)`} />
        {empty && <p class="chart-empty">No data yet</p>}
      </div>
      <details class="chart-table">
        <summary>Show the numbers</summary>
        <table>
          <thead>
            <tr>
              <th scope="col">{kind === "bar" ? "Key" : "Time"}</th>
              {series.map((s) => (
                <th scope="col" key={s.label}>
                  {s.label}
                </th>
              ))}
            </tr>
          </thead>
          <tbody>
            {labels.map((label, row) => (
              <tr key={`${label}-${row}`}>
                <th scope="row">{label}</th>
                {series.map((s) => (
                  <td key={s.label}>{s.values[row] === null || s.values[row] === undefined ? "—" : fmt(s.values[row] as number)}</td>
                ))}
              </tr>
            ))}
          </tbody>
        </table>
      </details>
    </figure>
  );
}
