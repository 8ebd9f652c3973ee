/**
 * Postgres array literals for the commit's `unnest(…)` parameters, built with one
 * join. pg would build the same literal element by element, quoting and
 * escaping each: measured, the largest allocation of the receive path (about
 * 7 KB an event), and garbage collection is what the worker's CPU goes to next
 * after signatures. A value holding a quote or backslash (none of the names the
 * protocol allows can) is left to pg's own serialisation.
 */

/** A `text[]` literal, or the array itself for pg to serialise when a value needs escaping. */
export function textArray(values: readonly string[]): string | readonly string[] {
  for (const v of values) if (v.includes('"') || v.includes("\\")) return values;
  return values.length === 0 ? "{}" : `{"${values.join('","')}"}`;
}

/** A `float8[]` or `bigint[]` literal: JavaScript's number syntax is Postgres's (Infinity and NaN included). */
export function numberArray(values: readonly number[]): string {
  return `{${values.join(",")}}`;
}
