// Reliable byte streams over links that may change (PROTOCOL.md section 8):
// a sender keeps every byte until it is acknowledged and resends from the
// last acknowledgement; a receiver takes each byte exactly once.

import { CONTROL_STREAM, MAX_DATA, ACK, encodeData, encodeMark } from './frame.js';

/** The outgoing half of a stream. */
export class OutStream {
  /**
   * @param {number} id the stream number
   * @param {number} capacity most unacknowledged bytes kept
   */
  constructor(id, capacity) {
    this.id = id;
    this.capacity = capacity;
    /** Unacknowledged bytes, starting at offset `acked`. */
    this.buf = new Uint8Array(0);
    this.acked = 0;
    this.sent = 0;
    this.lastProgress = performance.now();
  }

  /** How many more bytes fit. */
  room() {
    return this.capacity - this.buf.length;
  }

  /** The offset just past the last byte queued. */
  end() {
    return this.acked + this.buf.length;
  }

  /** Queues bytes; the caller checked `room()`. */
  push(bytes) {
    if (!this.inFlight()) this.lastProgress = performance.now();
    const joined = new Uint8Array(this.buf.length + bytes.length);
    joined.set(this.buf);
    joined.set(bytes, this.buf.length);
    this.buf = joined;
  }

  /** The next DATA frame to send, or null when everything queued was sent. */
  nextFrame() {
    const start = this.sent - this.acked;
    if (start >= this.buf.length) return null;
    const chunk = this.buf.subarray(start, Math.min(start + MAX_DATA, this.buf.length));
    const frame = encodeData(this.id, this.sent, chunk);
    this.sent += chunk.length;
    return frame;
  }

  /** The peer has every byte below `offset`. */
  ack(offset) {
    offset = Math.min(offset, this.sent);
    if (offset <= this.acked) return;
    this.buf = this.buf.slice(offset - this.acked);
    this.acked = offset;
    this.lastProgress = performance.now();
  }

  /** Sends everything unacknowledged again (the link changed). */
  rewind() {
    this.sent = this.acked;
    this.lastProgress = performance.now();
  }

  /** Rewinds when no acknowledgement came for `afterMs`. */
  resendIfStalled(afterMs) {
    if (this.inFlight() && performance.now() - this.lastProgress >= afterMs) this.rewind();
  }

  inFlight() {
    return this.sent > this.acked;
  }

  /** The bytes not yet acknowledged (to carry over to a new session). */
  unacknowledged() {
    return this.buf;
  }
}

/** The incoming half of a stream: which offset comes next. */
export class InStream {
  constructor(next = 0) {
    this.next = next;
  }

  /**
   * Takes the part of a DATA frame not seen yet; null for a duplicate or a
   * frame beyond a gap (the sender resends).
   */
  accept(offset, bytes) {
    const end = offset + bytes.length;
    if (offset > this.next || end <= this.next) return null;
    const fresh = bytes.subarray(this.next - offset);
    this.next = end;
    return fresh;
  }

  /** Bytes below `offset` will never come (SKIP, or a resume further on). */
  skipTo(offset) {
    this.next = Math.max(this.next, offset);
  }
}

/** Most bytes of one control message. */
const MAX_MESSAGE = 4 * 1024 * 1024;
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

/**
 * Stream 0: JSON messages, each a 4-byte big-endian length and that many
 * bytes, in both directions.
 */
export class ControlStream {
  constructor(capacity) {
    this.out = new OutStream(CONTROL_STREAM, capacity);
    this.input = new InStream();
    this.pending = new Uint8Array(0);
  }

  /** Queues a message; false when the stream is backed up. */
  queue(message) {
    const json = utf8.encode(JSON.stringify(message));
    const framed = new Uint8Array(4 + json.length);
    new DataView(framed.buffer).setUint32(0, json.length);
    framed.set(json, 4);
    if (framed.length > this.out.room()) return false;
    this.out.push(framed);
    return true;
  }

  /**
   * Takes a DATA frame of stream 0. Returns the ACK to send and the
   * messages it completed (parsed; ones that are not JSON are skipped).
   */
  receive(offset, bytes) {
    const messages = [];
    const fresh = this.input.accept(offset, bytes);
    if (fresh) {
      const joined = new Uint8Array(this.pending.length + fresh.length);
      joined.set(this.pending);
      joined.set(fresh, this.pending.length);
      let at = 0;
      while (joined.length - at >= 4) {
        const len = new DataView(joined.buffer, at, 4).getUint32(0);
        if (len > MAX_MESSAGE) {
          console.warn(`control message of ${len} bytes; the stream starts over`);
          at = joined.length;
          break;
        }
        if (joined.length - at - 4 < len) break;
        const text = fromUtf8.decode(joined.subarray(at + 4, at + 4 + len));
        at += 4 + len;
        try {
          messages.push(JSON.parse(text));
        } catch (err) {
          console.warn('undecodable control message', err);
        }
      }
      this.pending = joined.slice(at);
    }
    return { ack: encodeMark(ACK, CONTROL_STREAM, this.input.next), messages };
  }
}
