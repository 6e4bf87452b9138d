// The wire layer against the byte layouts of PROTOCOL.md sections 7 and 8.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as f from '../src/frame.js';
import { ControlStream, InStream, OutStream } from '../src/streams.js';

test('frames have the documented layout', () => {
  assert.deepEqual(
    [...f.encodeData(1, 258, new Uint8Array([0x68, 0x69]))],
    [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 0x68, 0x69],
  );
  assert.deepEqual([...f.encodeMark(f.ACK, 2, 5)], [2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 5]);
  assert.deepEqual([...f.encodePing(f.PING, 7n)], [4, 0, 0, 0, 0, 0, 0, 0, 7]);
  const data = f.decodeFrame(f.encodeData(3, 2 ** 40, new Uint8Array([9])));
  assert.equal(data.kind, f.DATA);
  assert.equal(data.stream, 3);
  assert.equal(data.offset, 2 ** 40);
  assert.deepEqual([...data.bytes], [9]);
  assert.equal(f.decodeFrame(f.encodePing(f.PONG, 2n ** 64n - 1n)).nonce, 2n ** 64n - 1n);
});

test('frames of unknown kinds or wrong lengths are dropped', () => {
  assert.equal(f.decodeFrame(new Uint8Array([])), null);
  assert.equal(f.decodeFrame(new Uint8Array([9, 0, 0])), null);
  assert.equal(f.decodeFrame(new Uint8Array([f.ACK, 0, 0, 0, 1])), null);
  assert.equal(f.decodeFrame(new Uint8Array([f.DATA, 0, 0])), null);
  assert.equal(f.decodeFrame(new Uint8Array(f.MAX_FRAME + 1).fill(1)), null);
});

test('relay messages carry an address before the frame', () => {
  const relay = f.encodeRelay('dev', new Uint8Array([4, 5]));
  assert.deepEqual([...relay], [3, 100, 101, 118, 4, 5]);
  const back = f.decodeRelay(relay);
  assert.equal(back.address, 'dev');
  assert.deepEqual([...back.frame], [4, 5]);
  assert.equal(f.decodeRelay(new Uint8Array([5, 1])), null, 'address past the end');
  assert.equal(f.decodeRelay(new Uint8Array([1, 0xff])), null, 'address not UTF-8');
});

test('a stream resends exactly the unacknowledged bytes', () => {
  const out = new OutStream(3, 1 << 20);
  out.push(new Uint8Array(f.MAX_DATA + 10).fill(7));
  const first = f.decodeFrame(out.nextFrame());
  const second = f.decodeFrame(out.nextFrame());
  assert.deepEqual([first.offset, first.bytes.length], [0, f.MAX_DATA]);
  assert.deepEqual([second.offset, second.bytes.length], [f.MAX_DATA, 10]);
  assert.equal(out.nextFrame(), null);
  out.ack(100);
  out.ack(50);
  out.rewind();
  const again = f.decodeFrame(out.nextFrame());
  assert.deepEqual([again.offset, again.bytes.length], [100, f.MAX_DATA + 10 - 100]);
  out.ack(Number.MAX_SAFE_INTEGER);
  assert.equal(out.inFlight(), false, 'acks beyond what was sent are clamped');
});

test('a receiver takes each byte once', () => {
  const input = new InStream();
  const b = (s) => new TextEncoder().encode(s);
  assert.deepEqual([...input.accept(0, b('abc'))], [...b('abc')]);
  assert.equal(input.accept(0, b('abc')), null, 'duplicate');
  assert.equal(input.accept(5, b('xy')), null, 'gap');
  assert.deepEqual([...input.accept(1, b('bcde'))], [...b('de')]);
  input.skipTo(9);
  assert.deepEqual([...input.accept(9, b('z'))], [...b('z')]);
});

test('control messages survive being split anywhere', () => {
  const sender = new ControlStream(1 << 20);
  sender.queue({ type: 'attach_pty', cols: 80, rows: 24, stream: 1 });
  sender.queue({ type: 'pty_close', session_id: 'é' });
  const bytes = f.decodeFrame(sender.out.nextFrame()).bytes;
  const receiver = new ControlStream(1 << 20);
  const got = [];
  for (let i = 0; i < bytes.length; i++) {
    const { ack, messages } = receiver.receive(i, bytes.subarray(i, i + 1));
    assert.equal(f.decodeFrame(ack).offset, i + 1);
    got.push(...messages);
  }
  assert.deepEqual(got, [
    { type: 'attach_pty', cols: 80, rows: 24, stream: 1 },
    { type: 'pty_close', session_id: 'é' },
  ]);
});
