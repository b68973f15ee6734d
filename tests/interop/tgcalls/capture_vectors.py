"""Captures signalling packets ntgcalls 3.0.5 emits for a fixed key, as test vectors.

    python3 capture_vectors.py OUT_FILE [version]

The key is bytes(range(256)); ntgcalls is the caller. The output has one hex packet per line
after a header; control's tests decrypt and parse them with siptg's own code.
"""
import asyncio
import sys

import ntgcalls as N


async def main(out, version):
    loop = asyncio.get_running_loop()
    call = N.NTgCalls()
    await call.create_p2p_call(1)
    ext = N.AudioDescription(N.MediaSource.EXTERNAL, 48000, 1, "", True)
    mic = N.MediaDescription(microphone=ext, speaker=None, camera=None, screen=None)
    await call.set_stream_sources(1, N.StreamMode.CAPTURE, mic)
    await call.skip_exchange(1, bytes(range(256)), True)
    packets = []
    call.on_signaling_data(lambda _id, data: loop.call_soon_threadsafe(packets.append, bytes(data)))
    task = asyncio.ensure_future(call.connect_p2p(1, [], [version], True, None))
    for _ in range(30):
        await asyncio.sleep(0.1)
        if len(packets) >= 2:
            break
    task.cancel()
    with open(out, "w") as f:
        f.write(f"# ntgcalls 3.0.5, version {version}, caller, key = bytes(range(256))\n")
        for p in packets:
            f.write(p.hex() + "\n")
    print(f"{len(packets)} packets")
    await call.stop(1)


asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "8.0.0"))
