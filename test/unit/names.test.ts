import { describe, expect, it } from "vitest";
import { decodeBase64url, decodedLength, encodeBase64url, isCanonicalBase64url } from "../../src/protocol/base64url.ts";
import {
  homeserverFromToken,
  isClientId,
  isEventId,
  isHomeserverName,
  isKeyId,
  parseGroupId,
  splitKid,
  subjectToken,
} from "../../src/protocol/names.ts";
import {
  inboxStreamName,
  inboxSubject,
  inboxWildcard,
  reportSubject,
  senderOfInboxSubject,
} from "../../src/protocol/subjects.ts";

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/** A name of exactly `length` characters made of 63-character labels (the longest allowed). */
function nameOfLength(length: number): string {
  const labels: string[] = [];
  let remaining = length;
  while (remaining > 0) {
    const room = labels.length === 0 ? remaining : remaining - 1; // a dot before every label but the first
    const size = Math.min(63, room);
    labels.push("a".repeat(size - 1) + String(labels.length % 10));
    remaining -= labels.length === 1 ? size : size + 1;
  }
  return labels.join(".");
}

describe("homeserver names (DESIGN §3)", () => {
  it.each([
    "a",
    "0",
    "localhost",
    "beta.example.org",
    "a-b.example",
    "a--b.example",
    "xn--bcher-kva.example",
    "123.456",
    "alpha1.example2",
    `${"a".repeat(63)}.example`,
  ])("accepts %j", (name) => {
    expect(isHomeserverName(name)).toBe(true);
  });

  it.each([
    ["the empty string", ""],
    ["uppercase", "Alpha.example"],
    ["all uppercase", "LOCALHOST"],
    ["an underscore", "alpha_beta.example"],
    ["a leading hyphen", "-alpha.example"],
    ["a label with a leading hyphen", "alpha.-example"],
    ["a trailing hyphen", "alpha-.example"],
    ["a leading dot", ".alpha"],
    ["a trailing dot", "alpha."],
    ["an empty label", "alpha..example"],
    ["a 64-character label", `${"a".repeat(64)}.example`],
    ["a space", "alpha example"],
    ["surrounding whitespace", " alpha "],
    ["a trailing newline", "alpha\n"],
    ["a port", "alpha.example:8448"],
    ["a slash", "alpha/example"],
    ["an @", "room@alpha"],
    ["a #", "alpha#k1"],
    ["a non-ASCII letter", "bücher.example"],
    ["a NATS wildcard", "*"],
    ["a NATS full wildcard", ">"],
  ])("rejects %s (%j)", (_name, value) => {
    expect(isHomeserverName(value)).toBe(false);
  });

  it.each([undefined, null, 42, {}, ["alpha"], true])("rejects the non-string %j", (value) => {
    expect(isHomeserverName(value)).toBe(false);
  });

  it("accepts a name of exactly 253 characters", () => {
    const name = nameOfLength(253);
    expect(name).toHaveLength(253);
    expect(name.split(".").every((l) => l.length <= 63)).toBe(true);
    expect(isHomeserverName(name)).toBe(true);
  });

  it("rejects a name of 254 characters even when every label is valid", () => {
    const name = nameOfLength(254);
    expect(name).toHaveLength(254);
    expect(name.split(".").every((l) => l.length >= 1 && l.length <= 63)).toBe(true);
    expect(isHomeserverName(name)).toBe(false);
  });

  it("rejects a very long name without catastrophic backtracking", () => {
    const start = performance.now();
    expect(isHomeserverName(`${"a-".repeat(5000)}!`)).toBe(false);
    expect(isHomeserverName(`${"a.".repeat(5000)}-`)).toBe(false);
    expect(performance.now() - start).toBeLessThan(1000);
  });
});

describe("subject tokens (DESIGN §3)", () => {
  it("replaces every dot with an underscore", () => {
    expect(subjectToken("beta.example.org")).toBe("beta_example_org");
    expect(subjectToken("localhost")).toBe("localhost");
    expect(subjectToken("a-b.c-d")).toBe("a-b_c-d");
  });

  it.each(["localhost", "beta.example.org", "a-b.c--d.e", "xn--bcher-kva.example", "0.1.2.3"])(
    "round-trips %j through its token",
    (name) => {
      const token = subjectToken(name);
      expect(token).not.toContain(".");
      expect(homeserverFromToken(token)).toBe(name);
    },
  );

  it("round-trips a 253-character name", () => {
    const name = nameOfLength(253);
    expect(homeserverFromToken(subjectToken(name))).toBe(name);
  });

  it("gives distinct names distinct tokens", () => {
    const names = ["a.b", "a-b", "ab", "a.b.c", "a_b"].filter(isHomeserverName);
    expect(new Set(names.map(subjectToken)).size).toBe(names.length);
  });

  it.each([
    ["the empty token", ""],
    ["an uppercase token", "Beta_example"],
    ["a doubled underscore (empty label)", "beta__example"],
    ["a leading underscore", "_beta"],
    ["a trailing underscore", "beta_"],
    ["a leading hyphen", "-beta"],
    ["a wildcard", "*"],
    ["a token with a space", "beta example"],
  ])("maps %s back to no homeserver", (_name, token) => {
    expect(homeserverFromToken(token)).toBeUndefined();
  });
});

describe("group ids (DESIGN §3)", () => {
  it("splits <local>@<owner>", () => {
    expect(parseGroupId("room-1@alpha.example")).toEqual({ local: "room-1", owner: "alpha.example" });
  });

  it("accepts every local character class [A-Za-z0-9._~-]", () => {
    expect(parseGroupId("Az09._~-@alpha")).toEqual({ local: "Az09._~-", owner: "alpha" });
  });

  it("accepts a local part of 128 characters and rejects 129", () => {
    expect(parseGroupId(`${"g".repeat(128)}@alpha`)).toEqual({ local: "g".repeat(128), owner: "alpha" });
    expect(parseGroupId(`${"g".repeat(129)}@alpha`)).toBeUndefined();
  });

  it("accepts an owner of 253 characters", () => {
    const owner = nameOfLength(253);
    expect(parseGroupId(`room@${owner}`)).toEqual({ local: "room", owner });
    expect(parseGroupId(`room@${nameOfLength(254)}`)).toBeUndefined();
  });

  it.each([
    ["no @", "room"],
    ["an empty local part", "@alpha.example"],
    ["an empty owner", "room@"],
    ["two @", "ro@om@alpha.example"],
    ["an uppercase owner", "room@Alpha.example"],
    ["an owner with an underscore (a token, not a name)", "room@alpha_example"],
    ["a space in the local part", "my room@alpha"],
    ["a slash in the local part", "a/b@alpha"],
    ["a colon in the local part", "a:b@alpha"],
    ["a non-ASCII local part", "raüm@alpha"],
    ["only @", "@"],
  ])("rejects %s (%j)", (_name, value) => {
    expect(parseGroupId(value)).toBeUndefined();
  });

  it.each([undefined, null, 1, {}, ["room@alpha"]])("rejects the non-string %j", (value) => {
    expect(parseGroupId(value)).toBeUndefined();
  });
});

describe("client ids (DESIGN §3)", () => {
  it.each(["alice", "a", "user:alice@alpha.example/device-1", "A.b_c~d-e", "@alice:matrix.example", "1/2/3"])(
    "accepts %j",
    (cid) => {
      expect(isClientId(cid)).toBe(true);
    },
  );

  it("accepts 255 characters and rejects 256", () => {
    expect(isClientId("c".repeat(255))).toBe(true);
    expect(isClientId("c".repeat(256))).toBe(false);
  });

  it.each([
    ["the empty string", ""],
    ["a space", "alice smith"],
    ["a hash", "alice#1"],
    ["a trailing newline", "alice\n"],
    ["a question mark", "alice?x"],
    ["a plus", "a+b"],
    ["a comma", "a,b"],
    ["a quote", 'a"b'],
    ["a non-ASCII letter", "zoë"],
    ["a NUL", "a\u0000b"],
  ])("rejects %s", (_name, cid) => {
    expect(isClientId(cid)).toBe(false);
  });

  it.each([undefined, null, 5, {}])("rejects the non-string %j", (value) => {
    expect(isClientId(value)).toBe(false);
  });
});

describe("event ids and key ids", () => {
  it("event ids are 1–64 characters of [A-Za-z0-9_-]", () => {
    expect(isEventId("01J0ABCDEF-ghij_klmn")).toBe(true);
    expect(isEventId("0190f6b4-5d1c-7a4e-9c3b-6f1e2d3c4b5a")).toBe(true);
    expect(isEventId("e".repeat(64))).toBe(true);
    expect(isEventId("e".repeat(65))).toBe(false);
    expect(isEventId("")).toBe(false);
    expect(isEventId("a.b")).toBe(false);
    expect(isEventId("a b")).toBe(false);
    expect(isEventId("a~b")).toBe(false);
    expect(isEventId(7)).toBe(false);
  });

  it("key ids are 1–64 characters of [A-Za-z0-9._-]", () => {
    expect(isKeyId("k1")).toBe(true);
    expect(isKeyId("2025-01.main_key")).toBe(true);
    expect(isKeyId("k".repeat(64))).toBe(true);
    expect(isKeyId("k".repeat(65))).toBe(false);
    expect(isKeyId("")).toBe(false);
    expect(isKeyId("k#1")).toBe(false);
    expect(isKeyId("k/1")).toBe(false);
    expect(isKeyId(null)).toBe(false);
  });
});

describe("kid splitting", () => {
  it("splits <homeserver>#<key-id>", () => {
    expect(splitKid("alpha.example#k1")).toEqual({ homeserver: "alpha.example", keyId: "k1" });
    expect(splitKid("localhost#2025-01.a_b")).toEqual({ homeserver: "localhost", keyId: "2025-01.a_b" });
  });

  it.each([
    ["no #", "alpha.example"],
    ["an empty homeserver", "#k1"],
    ["an empty key id", "alpha.example#"],
    ["a second #", "alpha.example#k#1"],
    ["an invalid homeserver", "Alpha.example#k1"],
    ["a subject token instead of a name", "alpha_example#k1"],
    ["a 65-character key id", `alpha#${"k".repeat(65)}`],
    ["a key id with a slash", "alpha#k/1"],
    ["only #", "#"],
    ["the empty string", ""],
  ])("rejects %s (%j)", (_name, kid) => {
    expect(splitKid(kid)).toBeUndefined();
  });
});

describe("subjects and streams (DESIGN §4)", () => {
  it("builds the inbox subject from destination and sender tokens", () => {
    expect(inboxSubject("beta.example.org", "alpha.example")).toBe("fedrelay.v1.inbox.beta_example_org.alpha_example");
  });

  it("builds the inbox wildcard and stream name of a destination", () => {
    expect(inboxWildcard("beta.example.org")).toBe("fedrelay.v1.inbox.beta_example_org.*");
    expect(inboxStreamName("beta.example.org")).toBe("FEDRELAY_IN_beta_example_org");
    expect(inboxStreamName("localhost")).toBe("FEDRELAY_IN_localhost");
  });

  it("builds the report subject addressed to the original sender", () => {
    expect(reportSubject("alpha.example", "beta.example.org")).toBe("fedrelay.v1.report.alpha_example.beta_example_org");
  });

  it.each([
    ["beta.example.org", "alpha.example"],
    ["localhost", "a-b.c"],
    ["beta", nameOfLength(253)],
  ])("reads the sender back from inboxSubject(%j, …)", (destination, sender) => {
    expect(senderOfInboxSubject(inboxSubject(destination, sender))).toBe(sender);
  });

  it.each([
    ["a report subject", "fedrelay.v1.report.beta.alpha"],
    ["another version", "fedrelay.v2.inbox.beta.alpha"],
    ["another prefix", "relay.v1.inbox.beta.alpha"],
    ["a missing sender", "fedrelay.v1.inbox.beta"],
    ["an empty sender token", "fedrelay.v1.inbox.beta."],
    ["an extra token", "fedrelay.v1.inbox.beta.alpha.x"],
    ["a wildcard sender", "fedrelay.v1.inbox.beta.*"],
    ["a full wildcard", "fedrelay.v1.inbox.beta.>"],
    ["an uppercase sender token", "fedrelay.v1.inbox.beta.Alpha"],
    ["a sender token with a doubled underscore", "fedrelay.v1.inbox.beta.alpha__example"],
    ["the empty string", ""],
  ])("finds no sender in %s (%j)", (_name, subject) => {
    expect(senderOfInboxSubject(subject)).toBeUndefined();
  });
});

describe("canonical base64url", () => {
  it("round-trips every byte value and every length up to 32", () => {
    const all = Uint8Array.from({ length: 256 }, (_, i) => i);
    const text = encodeBase64url(all);
    expect(isCanonicalBase64url(text)).toBe(true);
    expect(decodeBase64url(text)).toEqual(Buffer.from(all));
    for (let n = 0; n <= 32; n++) {
      const bytes = Uint8Array.from({ length: n }, (_, i) => (i * 37 + n * 11) & 0xff);
      const encoded = encodeBase64url(bytes);
      expect(encoded).not.toMatch(/[=+/]/);
      expect(isCanonicalBase64url(encoded)).toBe(true);
      expect(decodedLength(encoded)).toBe(n);
      expect(decodeBase64url(encoded)).toEqual(Buffer.from(bytes));
    }
  });

  it("accepts the empty string as the encoding of zero bytes", () => {
    expect(isCanonicalBase64url("")).toBe(true);
    expect(decodeBase64url("")).toEqual(Buffer.alloc(0));
  });

  it("encodes only the bytes of a Uint8Array view, not its whole backing buffer", () => {
    const backing = Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(encodeBase64url(backing.subarray(2, 5))).toBe(Buffer.from([3, 4, 5]).toString("base64url"));
  });

  it.each([
    ["padding", "AQ=="],
    ["a single '='", "AQI="],
    ["'+'", "a+bc"],
    ["'/'", "a/bc"],
    ["a leading space", " AAAA"],
    ["a trailing space", "AAAA "],
    ["a trailing newline", "AAAA\n"],
    ["an inner newline", "AA\nAA"],
    ["a tab", "\tAAAA"],
    ["a dot", "AA.A"],
    ["a length of 1 mod 4", "AAAAA"],
    ["a single character", "A"],
    ["non-ASCII", "AAé"],
  ])("rejects %s (%j)", (_name, text) => {
    expect(isCanonicalBase64url(text)).toBe(false);
    expect(decodeBase64url(text)).toBeUndefined();
  });

  it("accepts exactly one of the 64 look-alikes when the last character carries 4 unused bits", () => {
    // "AQ" is the byte 0x01; "AR".."Af" decode to the same byte in lenient decoders.
    const canonical = [...ALPHABET].filter((c) => isCanonicalBase64url(`A${c}`));
    expect(canonical).toEqual(["A", "Q", "g", "w"]);
    for (const c of ALPHABET) {
      const text = `A${c}`;
      const lenient = Buffer.from(text, "base64url");
      const canonicalText = lenient.toString("base64url");
      expect(isCanonicalBase64url(text)).toBe(text === canonicalText);
    }
  });

  it("accepts exactly one of the look-alikes when the last character carries 2 unused bits", () => {
    for (const c of ALPHABET) {
      const text = `AA${c}`;
      const canonicalText = Buffer.from(text, "base64url").toString("base64url");
      expect(isCanonicalBase64url(text), text).toBe(text === canonicalText);
    }
    expect([...ALPHABET].filter((c) => isCanonicalBase64url(`AA${c}`))).toHaveLength(16);
  });

  it("never lets two different canonical strings decode to the same bytes", () => {
    const seen = new Map<string, string>();
    for (const a of ALPHABET) {
      for (const b of ALPHABET) {
        for (const text of [`${a}${b}`, `A${a}${b}`]) {
          const decoded = decodeBase64url(text);
          if (!decoded) continue;
          const key = decoded.toString("hex");
          expect(seen.get(key) ?? text).toBe(text);
          seen.set(key, text);
        }
      }
    }
  });

  it("computes decodedLength without decoding", () => {
    expect(decodedLength("")).toBe(0);
    expect(decodedLength("AA")).toBe(1);
    expect(decodedLength("AAA")).toBe(2);
    expect(decodedLength("AAAA")).toBe(3);
    const body = encodeBase64url(Buffer.alloc(64 * 1024));
    expect(decodedLength(body)).toBe(64 * 1024);
    expect(decodedLength(encodeBase64url(Buffer.alloc(64 * 1024 + 1)))).toBe(64 * 1024 + 1);
  });
});
