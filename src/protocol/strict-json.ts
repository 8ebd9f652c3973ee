/**
 * JSON as this protocol reads it: what JSON.parse accepts, less any object that
 * names a member twice. JSON.parse keeps the last of repeated names, another
 * parser may keep the first, and a stored token is evidence: it must mean one
 * thing to every reader (docs/protocol.md §10). Pure.
 *
 * Measured (node 24, this machine): a one-recipient claims set (529 bytes) scans
 * in 0.7 µs, a 1,000-recipient one (73 KB) in 170 µs, about 0.7 of what
 * JSON.parse takes over the same text; a signature check is ~63 µs.
 */

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const COLON = 0x3a;
const OPEN_OBJECT = 0x7b;
const CLOSE_OBJECT = 0x7d;
const OPEN_ARRAY = 0x5b;
const CLOSE_ARRAY = 0x5d;

const isSpace = (c: number): boolean => c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09;

/** Past this many members an object's names go into a Set; below, a short list searched in turn is cheaper. */
const SMALL = 16;

/**
 * Whether some object in `text`, which must be JSON that JSON.parse accepts,
 * names a member twice, comparing names as JSON.parse reads them (`"iss"` and
 * `"\u0069ss"` are the same name). One pass; strings are skipped with indexOf.
 */
export function hasRepeatedMember(text: string): boolean {
  // One entry per open container: the names seen so far of an object, or null for an array.
  const open: (string[] | Set<string> | null)[] = [];
  const end = text.length;
  let i = 0;
  while (i < end) {
    const c = text.charCodeAt(i);
    if (c === QUOTE) {
      let close = text.indexOf('"', i + 1);
      // A quote after an odd run of backslashes is inside the string.
      for (;;) {
        let slashes = 0;
        while (text.charCodeAt(close - 1 - slashes) === BACKSLASH) slashes += 1;
        if (slashes % 2 === 0) break;
        close = text.indexOf('"', close + 1);
      }
      const names = open[open.length - 1];
      if (names) {
        let next = close + 1;
        while (isSpace(text.charCodeAt(next))) next += 1;
        if (text.charCodeAt(next) === COLON) {
          const raw = text.slice(i + 1, close);
          const name = raw.includes("\\") ? (JSON.parse(`"${raw}"`) as string) : raw;
          if (Array.isArray(names)) {
            if (names.includes(name)) return true;
            names.push(name);
            if (names.length > SMALL) open[open.length - 1] = new Set(names);
          } else {
            if (names.has(name)) return true;
            names.add(name);
          }
        }
      }
      i = close + 1;
      continue;
    }
    if (c === OPEN_OBJECT) open.push([]);
    else if (c === OPEN_ARRAY) open.push(null);
    else if (c === CLOSE_OBJECT || c === CLOSE_ARRAY) open.pop();
    i += 1;
  }
  return false;
}

/** A JSON object, read strictly: undefined if `text` is not JSON, not an object, or repeats a member name. */
export function parseStrictObject(text: string): Record<string, unknown> | undefined {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) return undefined;
  return hasRepeatedMember(text) ? undefined : (value as Record<string, unknown>);
}
