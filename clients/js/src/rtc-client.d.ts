// Type declarations of the rtc JavaScript client (src/rtc-client.js).

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export interface RtcClientOptions {
  /** A JWT; or `getToken`, called on every (re)connect and before `exp` for `refresh`. */
  token?: string;
  getToken?: () => Promise<string> | string;
  /** A WebSocket implementation (default: globalThis.WebSocket). */
  WebSocket?: new (url: string) => WebSocket;
  /** Time source and timers (tests inject a fake one). */
  clock?: Clock;
  /** Random numbers in [0, 1) for the backoff jitter. */
  random?: () => number;
  /** Backoff base and cap in ms (defaults 500 and 20000). */
  backoffBase?: number;
  backoffCap?: number;
  /** Unacked publishes kept while disconnected (default 1000); more reject with `queue_full`. */
  maxQueue?: number;
  /** Publishes larger than this (bytes of JSON) reject with `too_large` (default 65536). */
  maxMessageBytes?: number;
  /** An application ping every this many ms; no answer by the next one reconnects (25000; 0: off). */
  pingInterval?: number;
}

export interface Welcome {
  type: "welcome";
  session: string;
  user: string;
  node: string;
  resumed: boolean;
  rooms?: string[];
}

export interface Message {
  type: "message";
  room: string;
  seq: number;
  from: string;
  data: Json;
  ts: number;
}

export interface Direct {
  type: "direct";
  from: string;
  seq: number;
  data: Json;
  ts: number;
}

export interface Presence {
  type: "presence";
  room: string;
  user: string;
  event: "join" | "leave";
}

/** Seqs `from`..`to` of `room` will never be delivered (`to` null: history was lost, seqs restart in `epoch`). */
export interface Gap {
  room: string;
  from: number;
  to: number | null;
  epoch?: string;
}

export interface Disconnected {
  code: number;
  reason: string;
  willReconnect: boolean;
}

export declare class RtcError extends Error {
  /** The server's error code (bad_request, forbidden, not_joined, too_large, unavailable, ...) or queue_full, closed, disconnected. */
  code: string;
  constructor(code: string, message?: string);
}

declare class Emitter<Events> {
  on<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): () => void;
  off<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): void;
}

export interface Joined {
  type: "joined";
  room: string;
  seq: number;
  epoch: string;
  recovered: boolean;
}

export interface RoomEvents {
  /** Each (re)join: `recovered` false means history no longer reached the client's position. */
  joined: Joined;
  message: Message;
  presence: Presence;
  gap: Gap;
  error: RtcError;
}

export declare class Room extends Emitter<RoomEvents> {
  readonly name: string;
  /** The last seq delivered to the application (null before `joined`). */
  readonly seq: number | null;
  readonly epoch: string | null;
  /** Resolves to the seq once acked; queued and retried with the same id across reconnects. */
  publish(data: Json): Promise<number>;
  members(): Promise<{ users: string[]; count: number }>;
  leave(): Promise<void>;
}

export interface ClientEvents {
  connected: Welcome;
  resumed: Welcome;
  disconnected: Disconnected;
  closed: { code: number; reason: string };
  direct: Direct;
  error: Error;
}

export declare class RtcClient extends Emitter<ClientEvents> {
  constructor(url: string, options: RtcClientOptions);
  readonly state: "disconnected" | "connecting" | "connected" | "closed";
  readonly session: string | null;
  readonly user: string | null;
  /** Publishes not acked yet. */
  readonly queued: number;
  /** Drop the socket and reconnect now, resuming the session. */
  reconnect(): void;
  /** Resolves on the first welcome; rejects if the client stops before it. */
  connect(): Promise<RtcClient>;
  join(room: string): Promise<Room>;
  /** Send to every connection of `user`: resolves to the seq in that user's inbox. */
  direct(user: string, data: Json): Promise<number>;
  close(): void;
}

/** Full-jitter exponential backoff in ms: random in [0, min(cap, base * 2^attempt)). */
export declare function backoffDelay(attempt: number, random?: () => number, base?: number, cap?: number): number;
/** What a close code allows. */
export declare function closeAction(code: number, canRefresh: boolean): "reconnect" | "refresh" | "stop";
/** A JWT's `exp` in ms, or null. */
export declare function tokenExpiry(token: string): number | null;
