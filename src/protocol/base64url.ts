/** Strict base64url (RFC 4648 §5, no padding), as DESIGN §5 step 1 requires. Pure. */

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const BASE64URL_RE = /^[A-Za-z0-9_-]*$/;

/**
 * Canonical: only the alphabet, no padding, a length that encodes whole bytes, and
 * zero bits in the unused tail of the last character. Two different strings must
 * never decode to the same bytes, or a signed token would have look-alikes.
 */
export function isCanonicalBase64url(text: string): boolean {
  if (text.length % 4 === 1 || !BASE64URL_RE.test(text)) return false;
  const rem = text.length % 4;
  if (rem === 0) return true;
  const last = ALPHABET.indexOf(text[text.length - 1]!);
  return rem === 2 ? (last & 0x0f) === 0 : (last & 0x03) === 0;
}

/** Bytes a canonical base64url string decodes to, without decoding it. */
export function decodedLength(text: string): number {
  return Math.floor((text.length * 3) / 4);
}

export function decodeBase64url(text: string): Buffer | undefined {
  return isCanonicalBase64url(text) ? Buffer.from(text, "base64url") : undefined;
}

export function encodeBase64url(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64url");
}

/** Each byte's 6-bit value in the alphabet, or -1. */
const SEXTET = new Int8Array(256).fill(-1);
for (let i = 0; i < ALPHABET.length; i++) SEXTET[ALPHABET.charCodeAt(i)] = i;

/**
 * Decodes `bytes[start, end)`, base64url text, into `out` (room for
 * `floor(3 * (end - start) / 4)` bytes, or null to check only), under the rules
 * of isCanonicalBase64url. Returns the decoded length, or -1 if not canonical.
 * Event tokens arrive as bytes: decoding them in place spares a string copy of
 * each part and a regular-expression pass over it.
 */
export function decodeCanonicalBase64urlBytes(bytes: Uint8Array, start: number, end: number, out: Uint8Array | null): number {
  const length = end - start;
  const rem = length % 4;
  if (rem === 1) return -1;
  const whole = end - rem;
  let j = 0;
  for (let i = start; i < whole; i += 4) {
    const a = SEXTET[bytes[i]!]!, b = SEXTET[bytes[i + 1]!]!, c = SEXTET[bytes[i + 2]!]!, d = SEXTET[bytes[i + 3]!]!;
    if ((a | b | c | d) < 0) return -1;
    if (out) {
      out[j] = (a << 2) | (b >> 4);
      out[j + 1] = ((b & 0x0f) << 4) | (c >> 2);
      out[j + 2] = ((c & 0x03) << 6) | d;
    }
    j += 3;
  }
  if (rem === 0) return j;
  const a = SEXTET[bytes[whole]!]!, b = SEXTET[bytes[whole + 1]!]!;
  if ((a | b) < 0) return -1;
  if (rem === 2) {
    if ((b & 0x0f) !== 0) return -1;
    if (out) out[j] = (a << 2) | (b >> 4);
    return j + 1;
  }
  const c = SEXTET[bytes[whole + 2]!]!;
  if (c < 0 || (c & 0x03) !== 0) return -1;
  if (out) {
    out[j] = (a << 2) | (b >> 4);
    out[j + 1] = ((b & 0x0f) << 4) | (c >> 2);
  }
  return j + 2;
}
