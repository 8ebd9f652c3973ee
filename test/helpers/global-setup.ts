/** Makes sure a nats-server 2.10+ binary is cached before any test spawns one. */
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";

export default function setup(): void {
  const script = fileURLToPath(new URL("../../scripts/fetch-nats-server.sh", import.meta.url));
  const path = execFileSync("bash", [script], { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] }).trim();
  process.env.FEDRELAY_NATS_SERVER = path;
}
