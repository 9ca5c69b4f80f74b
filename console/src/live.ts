// Following a stream that may break: backoff between tries, an abortable pause, and the bounded text of a log.

/** The pause before try number `failures` + 1 after `failures` broken tries in a row: 0.5 s doubling to 10 s, ±20%. */
export function backoffMs(failures: number): number {
  const base = Math.min(500 * 2 ** Math.max(failures - 1, 0), 10_000);
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

/** Resolves after `ms`, or at once when `signal` aborts. */
export function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = () => {
      window.clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = window.setTimeout(done, ms);
    signal.addEventListener("abort", done);
  });
}

export interface LogView {
  text: string; // what the page shows: the end of the log, at most `max` characters
  bytes: number; // bytes received in all
  trimmed: boolean; // the start of the log is not shown
}

/**
 * The end of a log as it grows: keeps at most `max` characters (cut at a line start when one is near), so a job
 * that writes gigabytes costs the page a bounded amount of memory and layout.
 */
export class LogBuffer {
  private text = "";
  private bytes = 0;
  private trimmed = false;

  constructor(private readonly max: number) {}

  push(chunk: string, bytes: number): void {
    this.text += chunk;
    this.bytes += bytes;
    if (this.text.length <= this.max) return;
    let cut = this.text.length - this.max;
    const line = this.text.indexOf("\n", cut);
    if (line >= 0 && line - cut < 4096) cut = line + 1;
    this.text = this.text.slice(cut);
    this.trimmed = true;
  }

  clear(): void {
    this.text = "";
    this.bytes = 0;
    this.trimmed = false;
  }

  view(): LogView {
    return { text: this.text, bytes: this.bytes, trimmed: this.trimmed };
  }
}
