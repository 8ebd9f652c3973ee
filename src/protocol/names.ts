/** Names of DESIGN §3 (wire). Pure. */

const LABEL = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?";
const HOMESERVER_RE = new RegExp(`^${LABEL}(?:\\.${LABEL})*$`);
const GROUP_LOCAL_RE = /^[A-Za-z0-9._~-]{1,128}$/;
const CLIENT_ID_RE = /^[A-Za-z0-9._~:@/-]{1,255}$/;
const KEY_ID_RE = /^[A-Za-z0-9._-]{1,64}$/;
const EVENT_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;

export function isHomeserverName(value: unknown): value is string {
  return typeof value === "string" && value.length <= 253 && HOMESERVER_RE.test(value);
}

/** Names hold no `_`, so the mapping is reversible. */
export function subjectToken(homeserver: string): string {
  return homeserver.replaceAll(".", "_");
}

export function homeserverFromToken(token: string): string | undefined {
  const name = token.replaceAll("_", ".");
  return isHomeserverName(name) ? name : undefined;
}

export function isClientId(value: unknown): value is string {
  return typeof value === "string" && CLIENT_ID_RE.test(value);
}

export function isEventId(value: unknown): value is string {
  return typeof value === "string" && EVENT_ID_RE.test(value);
}

export function isKeyId(value: unknown): value is string {
  return typeof value === "string" && KEY_ID_RE.test(value);
}

export interface GroupId {
  readonly local: string;
  readonly owner: string;
}

/** `<local>@<owner>`; the local part holds no `@`, so the last `@` splits. */
export function parseGroupId(value: unknown): GroupId | undefined {
  if (typeof value !== "string") return undefined;
  const at = value.lastIndexOf("@");
  if (at < 0) return undefined;
  const local = value.slice(0, at);
  const owner = value.slice(at + 1);
  if (!GROUP_LOCAL_RE.test(local) || !isHomeserverName(owner)) return undefined;
  return { local, owner };
}

/** A key's full id is `<homeserver>#<key-id>`. */
export function splitKid(kid: string): { homeserver: string; keyId: string } | undefined {
  const hash = kid.indexOf("#");
  if (hash < 0) return undefined;
  const homeserver = kid.slice(0, hash);
  const keyId = kid.slice(hash + 1);
  if (!isHomeserverName(homeserver) || !isKeyId(keyId)) return undefined;
  return { homeserver, keyId };
}
