// Reading job lists through ListJobs, which pages a tenant's jobs oldest first, or newest first with
// order_by=create_time desc, with opaque page tokens.

import { getJson, query } from "./api";
import type { Job, ListJobsResponse } from "./types";

export const SCAN_PAGE = 500; // the API's largest page
const MAX_SCAN_PAGES = 400; // 200,000 jobs: a bound on every walk, however many jobs a tenant keeps

export function listPage(
  state: string,
  pageSize: number,
  token: string,
  signal?: AbortSignal,
  newestFirst = false,
): Promise<ListJobsResponse> {
  const order_by = newestFirst ? "create_time desc" : undefined;
  return getJson<ListJobsResponse>(`/jobs${query({ state, page_size: pageSize, page_token: token, order_by })}`, signal);
}

export interface Newest {
  jobs: Job[]; // newest first: at least `want` when the tenant has that many
  requests: number;
}

export type Progress = (jobsRead: number) => void;

/**
 * The tenant's newest `want` jobs, newest first: pages of the API's newest-first order until `want` are read or
 * the list ends (a filtered page may hold fewer jobs than asked, with a token to go on).
 */
export async function newestJobs(state: string, want: number, signal?: AbortSignal, progress?: Progress): Promise<Newest> {
  const jobs: Job[] = [];
  let token = "";
  let requests = 0;
  while (jobs.length < want && requests < MAX_SCAN_PAGES) {
    const page = await listPage(state, Math.min(Math.max(want - jobs.length, 1), SCAN_PAGE), token, signal, true);
    requests++;
    jobs.push(...page.jobs);
    progress?.(jobs.length);
    if (!page.next_page_token) break;
    token = page.next_page_token;
  }
  return { jobs: jobs.slice(0, want), requests };
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
