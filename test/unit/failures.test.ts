import { describe, expect, it } from "vitest";
import { isTransient } from "../../src/receive/failures.ts";

describe("isTransient: what a commit failure says about retrying the same batch", () => {
  it("retries what an outage or a conflict causes, and nothing the batch causes", () => {
    const transient: unknown[] = [
      Object.assign(new Error("could not serialize access"), { code: "40001" }),
      Object.assign(new Error("deadlock detected"), { code: "40P01" }),
      Object.assign(new Error("terminating connection due to administrator command"), { code: "57P01" }),
      Object.assign(new Error("the database system is starting up"), { code: "57P03" }),
      Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:5432"), { code: "ECONNREFUSED", syscall: "connect", errno: -111 }),
      Object.assign(new Error("read ECONNRESET"), { code: "ECONNRESET", syscall: "read" }),
      new Error("Connection terminated unexpectedly"),
      new Error("timeout exceeded when trying to connect"),
    ];
    const permanent: unknown[] = [
      Object.assign(new Error("invalid input syntax"), { code: "22P02" }),
      Object.assign(new Error("index row size exceeds maximum"), { code: "54000" }),
      Object.assign(new Error("null value in column"), { code: "23502" }),
      new TypeError("Cannot read properties of undefined"),
      new RangeError("Maximum call stack size exceeded"),
      new Error("something else"),
      "a string", undefined, null,
    ];
    for (const err of transient) expect({ err: String((err as Error).message), transient: isTransient(err) }).toEqual({ err: String((err as Error).message), transient: true });
    for (const err of permanent) expect({ err: String(err), transient: isTransient(err) }).toEqual({ err: String(err), transient: false });
  });
});
