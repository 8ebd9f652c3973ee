import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { loadConfig } from "../../src/config.ts";
import { dispositionOf, EVENT_REASONS, HTTP_STATUS, RECIPIENT_REASONS } from "../../src/errors.ts";
import { splitByDestination } from "../../src/fanout.ts";
import { capabilityHash, capabilityHashHex } from "../../src/policy/capabilities.ts";
import { uuidv7 } from "../../src/protocol/event-id.ts";
import { isEventId } from "../../src/protocol/names.ts";
import { sampleOf } from "../../src/receive/batch.ts";
import { messageId } from "../../src/transport/publisher.ts";
import { batchLength, pullsByBytes } from "../../src/transport/consumer.ts";

describe("fan-out split", () => {
  it("groups recipients by destination in first-seen order and drops repeated clients", () => {
    const split = splitByDestination([
      { server: "beta", client: "bob", capability: "c1" },
      { server: "gamma", client: "gina" },
      { server: "beta", client: "bart" },
      { server: "beta", client: "bob", capability: "c1" },
    ]);
    expect([...split.entries()]).toEqual([
      ["beta", [{ cid: "bob", cap: "c1" }, { cid: "bart" }]],
      ["gamma", [{ cid: "gina" }]],
    ]);
  });
});

describe("error codes", () => {
  it("every protocol reason has an HTTP status, and only a duplicate is acknowledged rather than terminated", () => {
    for (const r of [...EVENT_REASONS, ...RECIPIENT_REASONS]) expect(HTTP_STATUS[r]).toBeGreaterThanOrEqual(400);
    expect(EVENT_REASONS.filter((r) => dispositionOf(r) === "ack")).toEqual(["duplicate"]);
  });
});

describe("small helpers", () => {
  it("event ids are UUIDv7, valid jti values, ordered by time", () => {
    const a = uuidv7(1_700_000_000_000);
    const b = uuidv7(1_700_000_000_001);
    expect(a).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(isEventId(a)).toBe(true);
    expect(a < b).toBe(true);
  });
  it("the Nats-Msg-Id is the unpadded base64url SHA-256 of the bytes", () => {
    expect(messageId(Buffer.from("abc"))).toBe("ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
  });
  it("a refused event's sample is bounded and holds no NUL or control bytes", () => {
    const sample = sampleOf(Buffer.concat([Buffer.from([0, 1, 0x7f, 0xff]), Buffer.from("a.b"), Buffer.alloc(10_000, 0x41)]));
    expect(sample.startsWith("\\x00\\x01\\x7f\\xffa.b")).toBe(true);
    // eslint-disable-next-line no-control-regex
    expect(sample).not.toMatch(/[\u0000-\u001f]/);
    expect(sample.length).toBeLessThanOrEqual(4096 * 4);
  });
  it("the example production config in deploy/ is valid", () => {
    const path = new URL("../../deploy/fedrelay.example.json", import.meta.url);
    const config = loadConfig({ file: { path: path.pathname, text: readFileSync(path, "utf8") } });
    expect(config.homeserver).toBe("beta.example.org");
    expect(config.postgres.schema).toBe("fedrelay_beta_example_org");
  });
});

describe("batch sizing", () => {
  const msgs = (...sizes: number[]) => sizes.map((n) => ({ data: new Uint8Array(n) }));
  it("takes up to the batch size when messages are small", () => {
    expect(batchLength(msgs(10, 10, 10, 10), 3, 1000)).toBe(3);
  });
  it("ends a batch before it exceeds the byte budget", () => {
    expect(batchLength(msgs(400, 400, 400), 10, 1000)).toBe(2);
  });
  it("always takes at least one message, however large", () => {
    expect(batchLength(msgs(5000, 10), 10, 1000)).toBe(1);
  });
  it("takes nothing from an empty queue", () => {
    expect(batchLength([], 10, 1000)).toBe(0);
  });
  it("pulls by bytes only from a nats-server that ends such pulls when served (2.10 and later)", () => {
    expect(pullsByBytes("2.10.0")).toBe(true);
    expect(pullsByBytes("2.10.27")).toBe(true);
    expect(pullsByBytes("2.11.4")).toBe(true);
    expect(pullsByBytes("3.0.0")).toBe(true);
    expect(pullsByBytes("2.9.10")).toBe(false);
    expect(pullsByBytes("2.2.0")).toBe(false);
    expect(pullsByBytes("1.12.0")).toBe(false);
    expect(pullsByBytes(undefined)).toBe(false);
    expect(pullsByBytes("garbage")).toBe(false);
  });
});

describe("capability hashes", () => {
  it("are SHA-256 of the secret's text, the same as bytes (stored) and as hex (matched in the commit)", () => {
    // FIPS 180-2's test vector for "abc".
    expect(capabilityHashHex("abc")).toBe("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    for (const secret of ["abc", "x".repeat(43), "\u00e9t\u00e9"]) {
      expect(capabilityHash(secret).toString("hex")).toBe(capabilityHashHex(secret));
    }
  });
});
