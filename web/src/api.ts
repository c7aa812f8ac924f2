// Clients of the platform's services over grpc-web, through the gateway that serves
// this page (same origin): `python -m crm_web serve` in development, Envoy's grpc_web
// filter in production.
import { BinaryReader } from "@bufbuild/protobuf/wire";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { AssignmentService } from "./gen/crm/assignment/v1/assignment_pb";

/** The signed-in agent's session, kept in sessionStorage (one tab, one agent). */
export interface Session {
  agentId: bigint;
  name: string;
  token: string;
  expiresAt: number; // ms since the epoch; 0 when the token does not expire
}

const SESSION_KEY = "crm.session";

export function loadSession(): Session | null {
  const raw = sessionStorage.getItem(SESSION_KEY);
  if (!raw) return null;
  try {
    const s = JSON.parse(raw) as { agentId: string; name: string; token: string; expiresAt: number };
    if (s.expiresAt && s.expiresAt < Date.now()) return null;
    return { ...s, agentId: BigInt(s.agentId) };
  } catch {
    return null;
  }
}

export function saveSession(s: Session | null): void {
  if (s === null) sessionStorage.removeItem(SESSION_KEY);
  else sessionStorage.setItem(SESSION_KEY, JSON.stringify({ ...s, agentId: s.agentId.toString() }));
}

/** Sends the agent's bearer token (the service scopes every call to that agent) and a
 * request id per call (it comes back in the trailers and is in every log line). */
const auth: Interceptor = (next) => async (req) => {
  const s = loadSession();
  if (s?.token) req.header.set("authorization", `Bearer ${s.token}`);
  if (!req.header.has("x-request-id")) req.header.set("x-request-id", `web-${crypto.randomUUID()}`);
  return next(req);
};

export const transport = createGrpcWebTransport({
  baseUrl: window.location.origin,
  interceptors: [auth],
});

export const assignment = createClient(AssignmentService, transport);

/** One field the service refused (google.rpc.BadRequest.FieldViolation). */
export interface FieldViolation {
  field: string;
  description: string;
}

const BAD_REQUEST = "google.rpc.BadRequest";

/** Decodes the google.rpc.BadRequest details of an error (field path + reason). */
export function fieldViolations(err: unknown): FieldViolation[] {
  if (!(err instanceof ConnectError)) return [];
  const out: FieldViolation[] = [];
  for (const d of err.details) {
    if (!("type" in d) || d.type !== BAD_REQUEST || !(d.value instanceof Uint8Array)) continue;
    const r = new BinaryReader(d.value);
    while (r.pos < r.len) {
      const [field, wire] = r.tag();
      if (field !== 1) {
        r.skip(wire);
        continue;
      }
      const v = new BinaryReader(r.bytes());
      const fv: FieldViolation = { field: "", description: "" };
      while (v.pos < v.len) {
        const [f, w] = v.tag();
        if (f === 1) fv.field = v.string();
        else if (f === 2) fv.description = v.string();
        else v.skip(w);
      }
      out.push(fv);
    }
  }
  return out;
}

/** A readable line for an error: code, message, and each refused field. */
export function describeError(err: unknown): string {
  if (err instanceof ConnectError) {
    const fields = fieldViolations(err).map((v) => `${v.field}: ${v.description}`);
    const head = `${Code[err.code]}: ${err.rawMessage}`;
    return fields.length ? `${head} (${fields.join("; ")})` : head;
  }
  return String(err);
}

export function isCode(err: unknown, code: Code): boolean {
  return err instanceof ConnectError && err.code === code;
}
