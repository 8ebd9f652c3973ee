/** The commit's hand-built array literals (src/store/arrays.ts) read back in Postgres as the values they came from. */
import fc from "fast-check";
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { numberArray, textArray } from "../../src/store/arrays.ts";
import { TEST_DATABASE_URL } from "../helpers/db.ts";

let client: pg.Client;
beforeAll(async () => {
  client = new pg.Client({ connectionString: TEST_DATABASE_URL });
  await client.connect();
});
afterAll(async () => client?.end());

const roundTrip = async (literal: unknown, type: string): Promise<unknown[]> =>
  (await client.query<{ v: unknown[] }>(`SELECT $1::${type}[] AS v`, [literal])).rows[0]!.v;

describe("textArray", () => {
  it("keeps commas, braces, spaces, empty strings, NULL as a word and non-ASCII as they are", async () => {
    const values = ["a,b", "{x}", " padded ", "", "NULL", "null", "grüße@example", "c1", "tab\there", "new\nline"];
    expect(textArray(values)).toBe('{"a,b","{x}"," padded ","","NULL","null","grüße@example","c1","tab\there","new\nline"}');
    expect(await roundTrip(textArray(values), "text")).toEqual(values);
  });

  it("leaves a value with a quote or a backslash to pg, which escapes it", async () => {
    const values = ['say "hi"', "back\\slash", "plain"];
    expect(textArray(values)).toBe(values);
    expect(await roundTrip(textArray(values), "text")).toEqual(values);
  });

  it("reads back any list of strings exactly", async () => {
    await fc.assert(fc.asyncProperty(fc.array(fc.string({ unit: "grapheme", maxLength: 12 }).filter((s) => !s.includes("\u0000")), { maxLength: 20 }), async (values) => {
      expect(await roundTrip(textArray(values), "text")).toEqual(values);
    }), { numRuns: 200 });
  });
});

describe("numberArray", () => {
  it("reads back floats, integers past 2^31, Infinity and an empty list (-0 as 0, as JavaScript prints it)", async () => {
    const floats = [0, 0.1, 1e21, -2.5e-7, Infinity, -Infinity, 1_800_000_000.25, 5e-324];
    expect((await roundTrip(numberArray(floats), "float8")).map(Number)).toEqual(floats);
    expect((await roundTrip(numberArray([-0]), "float8")).map(Number)).toEqual([0]);
    expect((await roundTrip(numberArray([2 ** 40, 1]), "bigint")).map(Number)).toEqual([2 ** 40, 1]);
    expect(await roundTrip(numberArray([]), "float8")).toEqual([]);
  });
});
