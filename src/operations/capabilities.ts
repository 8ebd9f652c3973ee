/**
 * Delivery capabilities (DESIGN §6) issued, listed and revoked on a client's
 * behalf: by the client itself, its homeserver's backend or an operator.
 */
import { RelayError } from "../errors.ts";
import { parseGroupId } from "../protocol/names.ts";
import { issueCapability, listCapabilities, revokeCapability, type CapabilityInfo } from "../store/capabilities.ts";
import { clientId, requireClient, type Operation } from "./operation.ts";

function groupId(value: string | undefined): { group: string; owner: string } {
  const parsed = parseGroupId(value);
  if (value === undefined || parsed === undefined) throw new RelayError("bad_request", `capability group: must be <local>@<owner>, got ${JSON.stringify(value ?? "")}`);
  return { group: value, owner: parsed.owner };
}

/** The secret is in the result once and never stored. */
export function issueCapabilityFor(client: string | undefined, group: string | undefined): Operation<CapabilityInfo & { capability: string }> {
  const id = clientId(client);
  const target = groupId(group);
  return async (db) => {
    await requireClient(db, id);
    return issueCapability(db, id, target.group, target.owner);
  };
}

/** Without their secrets. */
export function listCapabilitiesOf(client: string | undefined): Operation<{ capabilities: CapabilityInfo[] }> {
  const id = clientId(client);
  return async (db) => {
    await requireClient(db, id);
    return { capabilities: await listCapabilities(db, id) };
  };
}

/**
 * Revokes a capability of `client`'s; of any client's when undefined (an
 * operator). Another client's capability is not found, exactly like an unknown
 * one. Revoking twice keeps the first revocation's time.
 */
export function revokeCapabilityFor(capability: string | undefined, client?: string): Operation<void> {
  if (!capability) throw new RelayError("bad_request", "capability revoke needs a capability id");
  const owner = client === undefined ? undefined : clientId(client);
  return async (db) => {
    if (owner !== undefined) await requireClient(db, owner);
    if (!(await revokeCapability(db, capability, owner))) throw new RelayError("not_found", `no capability ${capability}`);
  };
}
