// The public API's JSON shapes (proto field names, enums as names), as far as the console reads them.

export type JobState =
  | "JOB_STATE_UNSPECIFIED"
  | "JOB_STATE_PENDING"
  | "JOB_STATE_RUNNING"
  | "JOB_STATE_SUCCEEDED"
  | "JOB_STATE_FAILED"
  | "JOB_STATE_CANCELLED";

export const TERMINAL_STATES: ReadonlySet<JobState> = new Set([
  "JOB_STATE_SUCCEEDED",
  "JOB_STATE_FAILED",
  "JOB_STATE_CANCELLED",
]);

export interface Money {
  currency: string;
  micros: string | number;
  amount: string;
}

export interface AttemptRecord {
  attempt: number;
  worker_id: string;
  pool_id: string;
  start_time?: string;
  end_time?: string;
  exit_code: number;
  reason: string;
  cpu_seconds: number;
  max_memory_mb: number;
}

export interface AttemptCost {
  attempt: number;
  cost?: Money;
  run_seconds: number;
  burst: boolean;
}

export interface JobSpec {
  name: string;
  command: string[];
  env?: Record<string, string>;
  resources?: { cpu_millis: number; memory_mb: number };
  pool?: string;
  sla_tier?: string;
  deadline?: string;
  burst?: boolean;
  max_runtime_seconds?: number;
  max_retries?: number;
  priority?: number;
}

export interface Job {
  job_id: string;
  tenant_id: string;
  state: JobState;
  spec: JobSpec;
  create_time?: string;
  start_time?: string;
  end_time?: string;
  update_time?: string;
  pool_id: string;
  worker_id: string;
  attempt: number;
  exit_code: number;
  reason: string;
  message: string;
  cost?: { total?: Money; attempts?: AttemptCost[] };
  queue: string;
  retries: number;
  burst_session_id: string;
  attempts?: AttemptRecord[];
  waiting_reason: string;
  queue_position: number;
  sla_miss: boolean;
}

export interface ListJobsResponse {
  jobs: Job[];
  next_page_token: string;
}

export interface QuotaAmounts {
  cpu_millis?: number;
  memory_mb?: number;
  concurrent_jobs?: number;
}

export interface BurstSession {
  session_id: string;
  tenant_id: string;
  cpu_millis: number;
  memory_mb: number;
  concurrent_jobs: number;
  start_time?: string;
  expire_time?: string;
  requested_by: string;
}

export interface Quota {
  tenant_id: string;
  limits?: QuotaAmounts;
  usage?: QuotaAmounts;
  burst?: BurstSession;
  utilization?: Record<string, number>;
  burst_sessions?: BurstSession[];
}

export interface Budget {
  tenant_id: string;
  monthly_limit?: Money;
  policy: string;
  spent_this_month?: Money;
  utilization: number;
}

export type PoolKind = "POOL_KIND_UNSPECIFIED" | "POOL_KIND_STATIC" | "POOL_KIND_DYNAMIC" | "POOL_KIND_BURST";

export interface Pool {
  pool_id: string;
  kind: PoolKind;
  min_workers: number;
  max_workers: number;
  worker_size?: { cpu_millis: number; memory_mb: number };
  labels?: Record<string, string>;
  workers: number;
  idle_workers: number;
  busy_workers: number;
  worker_slots: number;
  running_jobs: number;
}

export interface PoolMetrics {
  pool_id: string;
  workers_by_state?: Record<string, number>;
  utilization: number;
  queue_depth: number;
  provisioning_seconds_p50: number;
  provisioning_seconds_p95: number;
  success_rate: number;
  jobs_succeeded: number;
  jobs_failed: number;
  oldest_wait_seconds: number;
  running_jobs: number;
}

export interface ScalingEvent {
  time?: string;
  direction: string;
  from_workers: number;
  to_workers: number;
  trigger: string;
  reason: string;
  executed: boolean;
}

export interface CostLine {
  key: string;
  cost?: Money;
}

export interface Recommendation {
  kind: string;
  description: string;
  estimated_savings?: Money;
}

export interface CostReport {
  tenant_id: string;
  total?: Money;
  by_pool?: CostLine[];
  by_day?: CostLine[];
  burst_spend?: Money;
  jobs: number;
  recommendations?: Recommendation[];
}

export interface CostReportsResponse {
  reports: CostReport[];
  idle_cost?: Money;
}
