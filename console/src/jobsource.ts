// Reading job lists through ListJobs, which pages a tenant's jobs oldest first with opaque page tokens.

import { ApiError, getJson, query } from "./api";
import type { Job, ListJobsResponse } from "./types";

export const SCAN_PAGE = 500; // the API's largest page
const MAX_SCAN_PAGES = 400; // 200,000 jobs: a bound on every walk, however many jobs a tenant keeps

export function listPage(state: string, pageSize: number, token: string, signal?: AbortSignal): Promise<ListJobsResponse> {
  return getJson<ListJobsResponse>(`/jobs${query({ state, page_size: pageSize, page_token: token })}`, signal);
}

export interface Newest {
  jobs: Job[]; // newest first: at least `want` when the tenant has that many
  hint: string; // the page token where the next look for the newest jobs may start
  requests: number;
}

export type Progress = (jobsRead: number) => void;

interface PageAt {
  token: string; // the token this page was asked with
  jobs: Job[];
  next: string;
}

class Walker {
  requests = 0;
  read = 0;

  constructor(
    private readonly state: string,
    private readonly signal?: AbortSignal,
    private readonly progress?: Progress,
  ) {}

  /** Pages from `token` on, `size` jobs each, until the end or `maxPages`; only the last `keep` are kept. */
  async walk(token: string, size: number, maxPages: number, keep: number): Promise<PageAt[]> {
    const pages: PageAt[] = [];
    let at = token;
    for (let i = 0; i < maxPages; i++) {
      const page = await listPage(this.state, size, at, this.signal);
      this.requests++;
      this.read += page.jobs.length;
      this.progress?.(this.read);
      pages.push({ token: at, jobs: page.jobs, next: page.next_page_token });
      if (pages.length > keep) pages.shift();
      if (!page.next_page_token) break;
      at = page.next_page_token;
    }
    return pages;
  }
}

/** The newest `want` jobs of `pages` (oldest first), and the token of the earliest page they come from. */
function window(pages: PageAt[], want: number): { jobs: Job[]; hint: string } {
  const kept: PageAt[] = [];
  let count = 0;
  for (let i = pages.length - 1; i >= 0 && count < want; i--) {
    kept.unshift(pages[i]);
    count += pages[i].jobs.length;
  }
  if (!kept.length) return { jobs: [], hint: pages[0]?.token ?? "" };
  return { jobs: kept.flatMap((p) => p.jobs).reverse(), hint: kept[0].token };
}

/**
 * The tenant's newest `want` jobs. The API lists oldest first with opaque page tokens and no order parameter,
 * so the newest are found by walking to the end:
 *
 * 1. From `hint` (where the newest were last time), up to three pages of `want` jobs (one without a hint): when
 *    the hint is recent this reaches the end in one small request, the steady state of a live view.
 * 2. Still far from the end (a first visit, or an old hint): pages of 500 to the end; what they found is shown
 *    (`partial`), then the last one is read again in pages of `want`, so that the hint it returns is within
 *    about `want` jobs of the end.
 * 3. A hint that leaves fewer than `want` jobs before the end (jobs left the state filter) is dropped and the
 *    walk starts over from the beginning.
 */
export async function newestJobs(
  state: string,
  hint: string,
  want: number,
  signal?: AbortSignal,
  progress?: Progress,
  partial?: (jobs: Job[]) => void,
): Promise<Newest> {
  const size = Math.min(Math.max(want, 1), SCAN_PAGE);
  const walker = new Walker(state, signal, progress);
  let pages: PageAt[];
  try {
    pages = await walker.walk(hint, size, hint ? 3 : 1, MAX_SCAN_PAGES);
  } catch (e) {
    // A remembered hint the API does not take (400): start from the beginning.
    if (!hint || !(e instanceof ApiError) || e.status !== 400) throw e;
    return newestJobs(state, "", want, signal, progress, partial);
  }
  let older: PageAt[] = [];
  if (pages[pages.length - 1]?.next) {
    const coarse = await walker.walk(pages[pages.length - 1].next, SCAN_PAGE, MAX_SCAN_PAGES, 2);
    const last = coarse[coarse.length - 1];
    if (last.next) throw new Error(`more than ${MAX_SCAN_PAGES * SCAN_PAGE} jobs: use a state filter or the oldest-first pages`);
    older = [...pages.slice(-1), ...coarse];
    pages = [];
    if (last.jobs.length > 2 * size) {
      // Show what was found, then re-read the last page in small pages so the next look starts near the end.
      partial?.(window(older, want).jobs);
      pages = await walker.walk(last.token, size, Math.ceil(SCAN_PAGE / size) + 2, MAX_SCAN_PAGES);
      older = older.slice(0, -1);
    }
  }
  const found = window([...older, ...pages], want);
  if (hint && found.jobs.length < want && walker.requests === 1) {
    const again = await newestJobs(state, "", want, signal, progress, partial);
    return { ...again, requests: again.requests + walker.requests };
  }
  return { ...found, requests: walker.requests };
}

// Where the newest jobs start, per tenant and state filter, kept across visits so that the first view of a
// tenant with many jobs is one or two requests after the first visit. A page token names a position in the
// tenant's own list (no secret); signing out forgets them.
const HINT_PREFIX = "jobmesh.console.tail.";

export function recallHint(tenant: string, state: string): string {
  return localStorage.getItem(`${HINT_PREFIX}${tenant}.${state || "all"}`) ?? "";
}

export function rememberHint(tenant: string, state: string, hint: string): void {
  localStorage.setItem(`${HINT_PREFIX}${tenant}.${state || "all"}`, hint);
}

export function forgetHints(): void {
  for (const key of Object.keys(localStorage)) if (key.startsWith(HINT_PREFIX)) localStorage.removeItem(key);
}

export interface Scan {
  jobs: Job[];
  next: string;
  scanned: number;
}

/** Jobs whose name contains `name`, scanning forward from `token` until `want` match or 5,000 were read. */
export async function scanByName(state: string, name: string, want: number, token: string, signal?: AbortSignal): Promise<Scan> {
  const needle = name.toLowerCase();
  const jobs: Job[] = [];
  let scanned = 0;
  let next = token;
  for (let i = 0; i < 10; i++) {
    const page = await listPage(state, SCAN_PAGE, next, signal);
    scanned += page.jobs.length;
    jobs.push(...page.jobs.filter((j) => j.spec?.name?.toLowerCase().includes(needle)));
    next = page.next_page_token;
    if (!next || jobs.length >= want) break;
  }
  return { jobs, next, scanned };
}
