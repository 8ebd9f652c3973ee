/**
 * A compact JWS read the one strict way both events and reports are read
 * (docs/protocol.md §5 step 1, §8): three parts of canonical base64url (no
 * padding, no whitespace, only the URL-safe alphabet), a header and a payload
 * that are JSON objects naming no member twice, a 64-byte Ed25519 signature
 * verified with libsodium over the bytes as received. Pure but for the key.
 */
import sodium from "sodium-native";
import { decodeCanonicalBase64urlBytes } from "./base64url.ts";
import { hasRepeatedMember } from "./strict-json.ts";

const DOT = 0x2e;

/** Where decoded parts are put: one buffer, used only between awaits and grown on demand. */
let scratch = Buffer.allocUnsafe(4096);

/** The canonical base64url in `bytes[start, end)` decoded to text, or undefined if not canonical. */
function decodeText(bytes: Buffer, start: number, end: number): string | undefined {
  const room = Math.floor((3 * (end - start)) / 4);
  if (scratch.length < room) scratch = Buffer.allocUnsafe(room);
  const n = decodeCanonicalBase64urlBytes(bytes, start, end, scratch);
  return n < 0 ? undefined : scratch.toString("utf8", 0, n);
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);

export type CompactJws =
  | {
      readonly ok: true;
      readonly header: Record<string, unknown>;
      readonly payload: Record<string, unknown>;
      /** The bytes as received; the signature is `bytes[signatureStart…]`. */
      readonly bytes: Buffer;
      readonly signatureStart: number;
    }
  | { readonly ok: false; readonly detail: string };

/** Step 1's shape: parts, canonical encoding, JSON objects without repeated members. The signature is checked by verifySignature. */
export function readCompactJws(data: Uint8Array): CompactJws {
  // The parts are read straight from the bytes: the whole token never becomes a string
  // (a worker holds a batch of events until it commits; their bytes live off the heap).
  const bytes = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const dot1 = bytes.indexOf(DOT);
  const dot2 = dot1 < 0 ? -1 : bytes.indexOf(DOT, dot1 + 1);
  if (dot2 < 0 || bytes.indexOf(DOT, dot2 + 1) >= 0) return { ok: false, detail: "not a compact JWS (three dot-separated parts)" };
  const headerText = decodeText(bytes, 0, dot1);
  const payloadText = decodeText(bytes, dot1 + 1, dot2);
  if (headerText === undefined || payloadText === undefined || decodeCanonicalBase64urlBytes(bytes, dot2 + 1, bytes.length, null) < 0) {
    return { ok: false, detail: "JWS parts must be canonical base64url without padding" };
  }
  const header = parseJson(headerText);
  const payload = parseJson(payloadText);
  if (!isObject(header) || !isObject(payload)) return { ok: false, detail: "JWS header and payload must be JSON objects" };
  if (hasRepeatedMember(headerText)) return { ok: false, detail: "the JWS header names a member twice" };
  if (hasRepeatedMember(payloadText)) return { ok: false, detail: "the claims name a member twice" };
  return { ok: true, header, payload, bytes, signatureStart: dot2 + 1 };
}

/**
 * Whether the JWS's signature is a 64-byte Ed25519 signature by `publicKey` (32
 * raw bytes) over its signing input as received. libsodium: about half the
 * cost of node:crypto's verify (docs/benchmarks.md), and the stricter of the two
 * (it rejects non-canonical and small-order points).
 */
export function verifySignature(jws: { readonly bytes: Buffer; readonly signatureStart: number }, publicKey: Uint8Array): boolean {
  const { bytes, signatureStart } = jws;
  const length = bytes.length - signatureStart;
  // Decoded and checked with no await between: the scratch buffer is this call's until then.
  if (scratch.length < length) scratch = Buffer.allocUnsafe(length);
  const decoded = decodeCanonicalBase64urlBytes(bytes, signatureStart, bytes.length, scratch);
  return decoded === 64 && sodium.crypto_sign_verify_detached(scratch.subarray(0, 64), bytes.subarray(0, signatureStart - 1), publicKey);
}
