// A labelled usage bar (quota, budget) with optional threshold marks.

interface Props {
  label: string;
  value: number;
  max: number;
  text: string;
  thresholds?: number[]; // fractions of max, e.g. [0.8, 1]
}

export function Meter({ label, value, max, text, thresholds = [] }: Props) {
  const fraction = max > 0 ? value / max : 0;
  const level = fraction >= 1 ? "over" : fraction >= 0.8 ? "high" : "ok";
  const id = `meter-${label.replace(/\W+/g, "-").toLowerCase()}`;
  return (
    <div class="meter">
      <div class="meter-head">
        <span id={id} class="meter-label">
          {label}
        </span>
        <span class="meter-text">{text}</span>
      </div>
      <div
        class={`meter-track level-${level}`}
        role="meter"
        aria-labelledby={id}
        aria-valuemin={0}
        aria-valuemax={max}
        aria-valuenow={value}
        aria-valuetext={text}
      >
        <div class="meter-fill" style={{ width: `${Math.min(100, fraction * 100)}%` }} />
        {thresholds.map((t) => (
          <div key={t} class="meter-mark" style={{ left: `${Math.min(100, t * 100)}%` }} title={`${Math.round(t * 100)}%`} />
        ))}
      </div>
    </div>
  );
}
