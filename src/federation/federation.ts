/**
 * The federation file: what a hub operator writes to describe the NATS that
 * homeservers of different operators share (docs/operations.md, "Federating").
 * Parsed and validated here; `nats-config.ts` turns it into server configs.
 */
import { z } from "zod";
import { RelayError } from "../errors.ts";
import { isHomeserverName } from "../protocol/names.ts";

const port = z.number().int().min(1).max(65535);
const natsName = z.string().regex(/^[A-Za-z0-9_-]{1,64}$/, "must be 1–64 of [A-Za-z0-9_-]");
/** A user nkey's public half (`U…`): the hub only ever needs that. */
const publicNkey = z.string().regex(/^U[A-Z2-7]{55}$/, "must be a public user nkey (U…, 56 characters)");

export const federationSchema = z.strictObject({
  hub: z.strictObject({
    // Bridged homeservers reach their streams in this JetStream domain, across their leafnode.
    domain: natsName.default("hub"),
    clusterName: natsName.default("fedrelay-hub"),
    storeDir: z.string().min(1).default("/var/lib/fedrelay-hub"),
    /**
     * fsync every write before acknowledging (DESIGN §4). Default: on for a single node, which
     * otherwise can lose acknowledged events in a crash; off for a cluster, whose replicas do that job.
     */
    syncAlways: z.boolean().optional(),
    /** Stream replicas: default 3 on three nodes or more, else 1. */
    replicas: z.number().int().min(1).max(5).optional(),
    nodes: z.array(z.strictObject({
      name: natsName,
      /** How homeservers and the other nodes reach this node. */
      host: z.string().min(1),
      /** The interface it listens on. */
      listen: z.string().min(1).default("0.0.0.0"),
      clientPort: port.default(4222),
      clusterPort: port.default(6222),
      leafnodePort: port.default(7422),
    })).min(1),
    /**
     * The most the hub's streams may hold on disk, in bytes (its JetStream max_file_store and
     * HUB's account limit): size it to the disk. Unset: NATS's default, 75 % of the free space.
     */
    maxStoreBytes: z.number().int().min(1024 * 1024).optional(),
    /** The hub operator's own key, for `fedrelay nats-provision`; generated (and its seed written) when absent. */
    adminNkey: publicNkey.optional(),
  }),
  /** Every inbox and consumer the hub provisions; each homeserver's relay config must say the same (nats-config writes it). */
  streams: z.strictObject({
    maxMessagesPerSender: z.number().int().min(1).default(100_000),
    duplicateWindowSeconds: z.number().int().min(1).default(120),
    maxMessageBytes: z.number().int().min(1024).max(1024 * 1024).default(1024 * 1024),
    // Each homeserver's inbox, all senders together (the relay's inbox.maxBytes).
    maxInboxBytes: z.number().int().min(1024 * 1024).default(8 * 1024 ** 3),
    ackWaitSeconds: z.number().int().min(1).default(30),
    maxAckPending: z.number().int().min(1).default(5000),
  }).default({ maxMessagesPerSender: 100_000, duplicateWindowSeconds: 120, maxMessageBytes: 1024 * 1024, maxInboxBytes: 8 * 1024 ** 3, ackWaitSeconds: 30, maxAckPending: 5000 }),
  homeservers: z.record(
    z.string().refine(isHomeserverName, "must be a homeserver name (DESIGN §3)"),
    z.strictObject({
      /** shared: the relay connects to the hub. bridged: it runs its own nats-server, a leafnode of the hub. */
      topology: z.enum(["shared", "bridged"]),
      /** The homeserver's public nkey; it keeps the seed. Absent: nats-config makes a pair and writes the seed for it. */
      nkey: publicNkey.optional(),
      /** Bridged: its own server, where its relay connects and its outbox lives. */
      leaf: z.strictObject({
        listen: z.string().min(1).default("127.0.0.1"),
        port: port.default(4222),
        storeDir: z.string().min(1).default("/var/lib/fedrelay-nats"),
      }).optional(),
    }),
  ).refine((h) => Object.keys(h).length > 0, "needs at least one homeserver"),
});

export type Federation = z.infer<typeof federationSchema>;

/** Parses and validates a federation file's text; an invalid one fails naming the key. */
export function parseFederation(text: string, path: string): Federation {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (cause) {
    throw new RelayError("config_invalid", `federation file ${path}: ${(cause as Error).message}`, { cause });
  }
  const result = federationSchema.safeParse(json);
  if (!result.success) {
    const issue = result.error.issues[0]!;
    const key = issue.path.join(".") || (issue.code === "unrecognized_keys" ? issue.keys.join(", ") : "(root)");
    throw new RelayError("config_invalid", `federation file ${path}: ${key}: ${issue.message}`);
  }
  return result.data;
}
