/**
 * Reading Prometheus text in tests: a metric's value summed over its samples
 * whose labels include `labels` (so a per-peer counter reads as its total, or
 * as one peer's share).
 */
export function metricValue(text: string, name: string, labels: Readonly<Record<string, string>> = {}): number {
  let sum = 0;
  for (const line of text.split("\n")) {
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match || match[1] !== name) continue;
    const found = new Map([...(match[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)].map((m) => [m[1]!, m[2]!]));
    if (Object.entries(labels).every(([k, v]) => found.get(k) === v)) sum += Number(match[3]);
  }
  return sum;
}

/** The same, from a /metrics endpoint. */
export async function scrapeMetric(url: string, name: string, labels: Readonly<Record<string, string>> = {}, headers: Record<string, string> = {}): Promise<number> {
  return metricValue(await (await fetch(`${url}/metrics`, { headers })).text(), name, labels);
}
