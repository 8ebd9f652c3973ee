/**
 * decodeCanonicalBase64urlBytes (what verifyEvent decodes token parts with) is
 * held to the string functions it replaces on the hot path: canonical exactly
 * when isCanonicalBase64url says so, and then the same bytes as Node's decoder.
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { decodeCanonicalBase64urlBytes, encodeBase64url, isCanonicalBase64url } from "../../src/protocol/base64url.ts";

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/** Mostly alphabet characters, sometimes one a lenient decoder would take (padding, base64's + and /, space, high bytes). */
const textArb = fc.array(
  fc.oneof({ weight: 20, arbitrary: fc.constantFrom(...ALPHABET) }, fc.constantFrom("=", "+", "/", " ", ".", "\u0000", "\u00ff", "\u0080")),
  { maxLength: 40 },
).map((chars) => chars.join(""));

function check(text: string, prefix: string, suffix: string): void {
  const bytes = Buffer.from(prefix + text + suffix, "latin1");
  const start = prefix.length;
  const end = start + text.length;
  const out = Buffer.alloc(Math.floor((3 * text.length) / 4));
  const n = decodeCanonicalBase64urlBytes(bytes, start, end, out);
  expect(decodeCanonicalBase64urlBytes(bytes, start, end, null)).toBe(n);
  if (!isCanonicalBase64url(text)) {
    expect(n).toBe(-1);
    return;
  }
  const expected = Buffer.from(text, "base64url");
  expect(n).toBe(expected.length);
  expect(out.subarray(0, n).equals(expected)).toBe(true);
}

describe("decodeCanonicalBase64urlBytes", () => {
  it("agrees with isCanonicalBase64url and Buffer's decoder, anywhere in a buffer", () => {
    // Prefix and suffix are latin1 text around the part, as the other parts and dots are in a token.
    const around = fc.string({ unit: fc.integer({ min: 0, max: 255 }).map((c) => String.fromCharCode(c)), maxLength: 3 });
    fc.assert(fc.property(textArb, around, around, (text, prefix, suffix) => check(text, prefix, suffix)), { numRuns: 5000 });
  });

  it("decodes every encoding of random bytes, and rejects each non-canonical last character", () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 40 }), (raw) => {
      const text = encodeBase64url(raw);
      check(text, "", "");
      // The unused low bits of a last partial character set: a look-alike of the same bytes.
      if (text.length % 4 !== 0) check(text.slice(0, -1) + ALPHABET[ALPHABET.indexOf(text.at(-1)!) | 1], "", "");
    }), { numRuns: 2000 });
  });
});
