// Display helpers: enum labels, times, money.
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Category, Presence, Status } from "./gen/crm/assignment/v1/assignment_pb";
import { BusinessLine } from "./gen/crm/common/v1/common_pb";

/** "IN_PROGRESS" -> "in progress". */
function label(name: string | undefined): string {
  return (name ?? "?").toLowerCase().replace(/_/g, " ");
}

export const statusLabel = (s: Status): string => label(Status[s]);
export const categoryLabel = (c: Category): string => label(Category[c]);
export const presenceLabel = (p: Presence): string => label(Presence[p]);
/** Lines are data: a well-known line by its name, any other code (a line added by
 * config; the enum is open) as LINE_<code>, as the KPI labels show it. Never fails. */
export const lineLabel = (l: BusinessLine | number): string =>
  (l > 0 && BusinessLine[l]) || `LINE_${l}`;

/** Enum values except UNSPECIFIED, as [value, label] pairs for a <select>. */
export function enumOptions(e: Record<string, string | number>, fmt: (v: number) => string): [string, string][] {
  return Object.values(e)
    .filter((v): v is number => typeof v === "number" && v !== 0)
    .map((v) => [String(v), fmt(v)]);
}

export function ms(ts: Timestamp | undefined): number {
  return ts ? timestampDate(ts).getTime() : 0;
}

export function when(ts: Timestamp | undefined): string {
  if (!ts || (ts.seconds === 0n && ts.nanos === 0)) return "-";
  const d = timestampDate(ts);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

export function yuan(v: bigint): string {
  return `¥${Math.round(Number(v) / 1000).toLocaleString("en")}k`;
}

export function km(v: bigint): string {
  return `${Number(v).toLocaleString("en")} km`;
}
