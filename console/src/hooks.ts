// Small hooks shared by the views: the hash route, polling while the page is visible, a ticking clock.

import { useEffect, useRef, useState } from "preact/hooks";

export interface Route {
  path: string[];
  params: URLSearchParams;
}

function readRoute(): Route {
  const hash = window.location.hash.replace(/^#\/?/, "");
  const [path, search] = hash.split("?", 2);
  return { path: path ? path.split("/").map(decodeURIComponent) : [], params: new URLSearchParams(search ?? "") };
}

export function useRoute(): Route {
  const [route, setRoute] = useState(readRoute);
  useEffect(() => {
    const update = () => setRoute(readRoute());
    window.addEventListener("hashchange", update);
    return () => window.removeEventListener("hashchange", update);
  }, []);
  return route;
}

export function navigate(hash: string, replace = false): void {
  if (replace) history.replaceState(null, "", `#${hash}`);
  else window.location.hash = hash;
  if (replace) window.dispatchEvent(new HashChangeEvent("hashchange"));
}

/**
 * Calls `tick` now and then every `intervalMs` while the component is mounted and the tab is visible; a tick
 * never overlaps the previous one. `deps` restart the loop.
 */
export function usePolling(tick: (signal: AbortSignal) => Promise<void>, intervalMs: number, deps: unknown[]): void {
  const tickRef = useRef(tick);
  tickRef.current = tick;
  useEffect(() => {
    const controller = new AbortController();
    let timer: number | undefined;
    const run = async () => {
      if (controller.signal.aborted) return;
      if (document.visibilityState !== "hidden") {
        try {
          await tickRef.current(controller.signal);
        } catch {
          // Each view shows its own errors; the loop goes on.
        }
      }
      if (!controller.signal.aborted) timer = window.setTimeout(run, intervalMs);
    };
    void run();
    return () => {
      controller.abort();
      window.clearTimeout(timer);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
}

/** The current time, re-rendered every `intervalMs` (for countdowns and "x s ago"). */
export function useNow(intervalMs = 1000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const id = window.setInterval(() => setNow(Date.now()), intervalMs);
    return () => window.clearInterval(id);
  }, [intervalMs]);
  return now;
}

/** A bounded series of samples taken while the page is open (the API serves no history for these). */
export function pushSample<T>(series: T[], sample: T, max = 120): T[] {
  const next = [...series, sample];
  return next.length > max ? next.slice(next.length - max) : next;
}
