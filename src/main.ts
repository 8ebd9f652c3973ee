#!/usr/bin/env node
/** The only place that reads process.env and installs signal handlers. */
import { chmod, mkdir, open, readFile, writeFile } from "node:fs/promises";
import { dirname } from "node:path";
import { runCli } from "./cli.ts";

let signals = 0;
const shutdownSignal = new Promise<void>((resolve) => {
  const onSignal = (signal: NodeJS.Signals): void => {
    signals += 1;
    // The first signal drains gracefully; a second one means "now". Unacknowledged
    // messages are redelivered by JetStream, so exiting early loses nothing.
    if (signals > 1) {
      process.stderr.write(`fedrelay: second ${signal}, exiting now\n`);
      process.exit(1);
    }
    resolve();
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
});

const code = await runCli(process.argv.slice(2), {
  env: process.env,
  stdout: (line) => process.stdout.write(`${line}\n`),
  stderr: (line) => process.stderr.write(`${line}\n`),
  readFile: (path) => readFile(path, "utf8"),
  async writeSecretFile(path, text) {
    await mkdir(dirname(path), { recursive: true });
    const file = await open(path, "wx", 0o600);
    try {
      await file.writeFile(text);
    } finally {
      await file.close();
    }
  },
  async writeFile(path, text, { secret }) {
    await mkdir(dirname(path), { recursive: true });
    await writeFile(path, text, { mode: secret ? 0o600 : 0o644 });
    // A file that existed keeps its mode otherwise: a seed must never stay readable by others.
    await chmod(path, secret ? 0o600 : 0o644);
  },
  shutdownSignal,
});
process.exitCode = code;
// A command that is done exits, even if a library left a handle open.
setTimeout(() => process.exit(code), 1000).unref();
