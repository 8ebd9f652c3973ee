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
