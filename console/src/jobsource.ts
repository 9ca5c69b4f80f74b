// Reading job lists through ListJobs, which pages a tenant's jobs oldest first with opaque page tokens.

import { getJson, query } from "./api";
import type { Job, ListJobsResponse } from "./types";

export const SCAN_PAGE = 500; // the API's largest page
const MAX_SCAN_PAGES = 400; // 200,000 jobs: a bound on every walk, however many jobs a tenant keeps

export function listPage(state: string, pageSize: number, token: string, signal?: AbortSignal): Promise<ListJobsResponse> {
  return getJson<ListJobsResponse>(`/jobs${query({ state, page_size: pageSize, page_token: token })}`, signal);
}

export interface Newest {
  jobs: Job[]; // newest first, at most two pages of SCAN_PAGE
  hint: string; // where the next look for the newest jobs may start
  requests: number;
}

/**
 * The tenant's newest jobs. The API has no "newest first" order, so this walks the pages (500 at a time) from
 * `hint` to the end and keeps the last two; the hint it returns lets the next poll start near the end, so
 * following the newest jobs costs one or two requests once the first walk is done.
 */
export async function newestJobs(state: string, hint: string, signal?: AbortSignal): Promise<Newest> {
  let token = hint;
  let previous: { token: string; jobs: Job[] } | null = null;
  let last: { token: string; jobs: Job[] } = { token, jobs: [] };
  for (let i = 0; i < MAX_SCAN_PAGES; i++) {
    const page = await listPage(state, SCAN_PAGE, token, signal);
    previous = i === 0 ? null : last;
    last = { token, jobs: page.jobs };
    if (!page.next_page_token) {
      const jobs = [...(previous?.jobs ?? []), ...last.jobs].reverse();
      return { jobs, hint: previous?.token ?? last.token, requests: i + 1 };
    }
    token = page.next_page_token;
  }
  throw new Error(`more than ${MAX_SCAN_PAGES * SCAN_PAGE} jobs: use the state filter or the oldest-first pages`);
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
