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

/**
 * What one sender may hold of an inbox at most, at its quota of the largest events: a quarter.
 * The quota counts events (max_msgs_per_subject; JetStream has no per-subject byte limit) while
 * the inbox is bounded in bytes: 100,000 events of 1 MiB from one sender would fill an 8 GiB inbox
 * alone and have every other sender's publishes refused (an outside review did that). A quarter
 * takes four senders flooding at once to refuse a fifth, and each of them is a member the hub knows.
 */
export const SENDER_SHARE = 4;
/** A sender's quota however large the inbox: the relay's own default, and a bound on a stream's message count. */
const MAX_SENDER_QUOTA = 100_000;
/** An event in an inbox takes its bytes and its NATS headers (the inbox stream's max_msg_size adds the same). */
const HEADER_BYTES = 4096;

interface StreamSizes {
  readonly maxMessagesPerSender?: number | undefined;
  readonly maxMessageBytes: number;
  readonly maxInboxBytes: number;
}

/** The most events per sender a federation's inboxes allow (see SENDER_SHARE). Pure. */
export function senderQuotaOf(s: StreamSizes): number {
  return Math.min(MAX_SENDER_QUOTA, Math.floor(s.maxInboxBytes / SENDER_SHARE / (s.maxMessageBytes + HEADER_BYTES)));
}

/** Refuses a quota one sender could fill the inbox with; derives it when absent. */
function checkSenderQuota(s: StreamSizes, ctx: z.RefinementCtx): void {
  const most = senderQuotaOf(s);
  const share = Math.floor(s.maxInboxBytes / SENDER_SHARE);
  if (most < 1) {
    ctx.addIssue({
      code: "custom", path: ["maxInboxBytes"],
      message: `maxInboxBytes ${s.maxInboxBytes} / ${SENDER_SHARE} = ${share} holds not one event of maxMessageBytes ${s.maxMessageBytes} + ${HEADER_BYTES}: raise maxInboxBytes or lower maxMessageBytes`,
    });
  } else if (s.maxMessagesPerSender !== undefined && s.maxMessagesPerSender > most) {
    const bytes = s.maxMessagesPerSender * (s.maxMessageBytes + HEADER_BYTES);
    ctx.addIssue({
      code: "custom", path: ["maxMessagesPerSender"],
      message: `maxMessagesPerSender ${s.maxMessagesPerSender} × (maxMessageBytes ${s.maxMessageBytes} + ${HEADER_BYTES}) = ${bytes} bytes is over maxInboxBytes ${s.maxInboxBytes} / ${SENDER_SHARE} = ${share}: one sender could fill the inbox alone; at most ${most}`,
    });
  }
}

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
     * The most each hub node's streams may hold on disk, in bytes (its JetStream max_file_store):
     * size it to the disk. Unset: NATS's default, 75 % of the free space. Each homeserver's streams
     * are bounded on their own too (nats-config.ts, streamsStoreBytes).
     */
    maxStoreBytes: z.number().int().min(1024 * 1024).optional(),
    /** The hub operator's own key, for `fedrelay nats-provision`; generated (and its seed written) when absent. */
    adminNkey: publicNkey.optional(),
  }),
  /** Every inbox and consumer the hub provisions; each homeserver's relay config must say the same (nats-config writes it). */
  streams: z.strictObject({
    /**
     * Each sender's backlog in an inbox, in events (the stream's max_msgs_per_subject). Default: as
     * many of the largest events as fill a quarter of the inbox (SENDER_SHARE), at most 100,000
     * (2,040 with the defaults below); more is refused.
     */
    maxMessagesPerSender: z.number().int().min(1).optional(),
    duplicateWindowSeconds: z.number().int().min(1).default(120),
    maxMessageBytes: z.number().int().min(1024).max(1024 * 1024).default(1024 * 1024),
    // Each homeserver's inbox, all senders together (the relay's inbox.maxBytes).
    maxInboxBytes: z.number().int().min(1024 * 1024).default(8 * 1024 ** 3),
    ackWaitSeconds: z.number().int().min(1).default(30),
    maxAckPending: z.number().int().min(1).default(5000),
  }).default({ duplicateWindowSeconds: 120, maxMessageBytes: 1024 * 1024, maxInboxBytes: 8 * 1024 ** 3, ackWaitSeconds: 30, maxAckPending: 5000 })
    .superRefine(checkSenderQuota)
    .transform((s) => ({ ...s, maxMessagesPerSender: s.maxMessagesPerSender ?? senderQuotaOf(s) })),
  homeservers: z.record(
    z.string().refine(isHomeserverName, "must be a homeserver name (DESIGN §3)"),
    z.strictObject({
      /** shared: the relay connects to the hub. bridged: it runs its own nats-server, a leafnode of the hub. */
      topology: z.enum(["shared", "bridged"]),
      /** The homeserver's public nkey; it keeps the seed. Absent: nats-config makes a pair and writes the seed for it. */
      nkey: publicNkey.optional(),
      /**
       * Its connections to the hub at once (each may hold SUBSCRIPTIONS_PER_CONNECTION subscriptions):
       * every relay process (`serve`, each `worker`) holds one. 16: a dozen workers, and room for an
       * operator's tool; without a bound, one homeserver's connections cost the hub memory without end
       * (an outside review: 2,000 extra connections, all accepted). Bridged: its relays connect to its
       * own server, and its leafnodes to the hub count here (measured on nats-server 2.10.27).
       */
      maxConnections: z.number().int().min(1).max(10_000).default(16),
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
