// Session frames (PROTOCOL.md section 8) and relay messages (section 7).
//
// Integers are big-endian. Offsets are u64 on the wire and plain numbers
// here: exact up to 2^53 bytes, which no terminal reaches.

export const DATA = 0x01;
export const ACK = 0x02;
export const FIN = 0x03;
export const PING = 0x04;
export const PONG = 0x05;
export const SKIP = 0x06;

/** Largest frame on any link. */
export const MAX_FRAME = 16 * 1024;
const DATA_HEADER = 1 + 4 + 8;
/** Most payload bytes in one DATA frame. */
export const MAX_DATA = MAX_FRAME - DATA_HEADER;
/** Stream 0 carries length-prefixed JSON messages. */
export const CONTROL_STREAM = 0;

/** A DATA frame: `bytes` of `stream` starting at `offset`. */
export function encodeData(stream, offset, bytes) {
  const out = new Uint8Array(DATA_HEADER + bytes.length);
  const view = new DataView(out.buffer);
  view.setUint8(0, DATA);
  view.setUint32(1, stream);
  view.setBigUint64(5, BigInt(offset));
  out.set(bytes, DATA_HEADER);
  return out;
}

/** An ACK, FIN or SKIP frame: a kind, a stream and an offset. */
export function encodeMark(kind, stream, offset) {
  const out = new Uint8Array(13);
  const view = new DataView(out.buffer);
  view.setUint8(0, kind);
  view.setUint32(1, stream);
  view.setBigUint64(5, BigInt(offset));
  return out;
}

/** A PING or PONG frame with a 64-bit nonce (a BigInt). */
export function encodePing(kind, nonce) {
  const out = new Uint8Array(9);
  const view = new DataView(out.buffer);
  view.setUint8(0, kind);
  view.setBigUint64(1, nonce);
  return out;
}

/**
 * Reads one frame. Returns null for a frame of an unknown kind or a wrong
 * length (the protocol says to drop those).
 * @param {Uint8Array} bytes
 */
export function decodeFrame(bytes) {
  if (bytes.length < 1 || bytes.length > MAX_FRAME) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const kind = view.getUint8(0);
  switch (kind) {
    case DATA:
      if (bytes.length < DATA_HEADER) return null;
      return {
        kind,
        stream: view.getUint32(1),
        offset: Number(view.getBigUint64(5)),
        bytes: bytes.subarray(DATA_HEADER),
      };
    case ACK:
    case FIN:
    case SKIP:
      if (bytes.length !== 13) return null;
      return { kind, stream: view.getUint32(1), offset: Number(view.getBigUint64(5)) };
    case PING:
    case PONG:
      if (bytes.length !== 9) return null;
      return { kind, nonce: view.getBigUint64(1) };
    default:
      return null;
  }
}

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder('utf-8', { fatal: true });

/** A relay message: `[address length u8][address][frame]`. */
export function encodeRelay(address, frame) {
  const addr = utf8.encode(address);
  if (addr.length > 255) throw new Error('relay address too long');
  const out = new Uint8Array(1 + addr.length + frame.length);
  out[0] = addr.length;
  out.set(addr, 1);
  out.set(frame, 1 + addr.length);
  return out;
}

/** Splits a relay message into the sender's address and the frame, or null. */
export function decodeRelay(bytes) {
  if (bytes.length < 1) return null;
  const end = 1 + bytes[0];
  if (end > bytes.length) return null;
  try {
    return { address: fromUtf8.decode(bytes.subarray(1, end)), frame: bytes.subarray(end) };
  } catch {
    return null;
  }
}
