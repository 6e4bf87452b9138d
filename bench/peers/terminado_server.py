"""terminado for the benchmark: one bash per WebSocket connection.

Serves terminado's TermSocket with a UniqueTermManager at /websocket on
127.0.0.1. Usage: terminado_server.py PORT [COMMAND...] (port 0: any
free port; the command defaults to bash). Prints "LISTENING <port>" on
stdout once it accepts connections.
"""

import asyncio
import socket
import sys

import tornado.httpserver
import tornado.netutil
import tornado.web
from terminado import TermSocket, UniqueTermManager


async def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    command = sys.argv[2:] or ["bash"]
    manager = UniqueTermManager(shell_command=command)
    app = tornado.web.Application(
        [(r"/websocket", TermSocket, {"term_manager": manager})]
    )
    sockets = tornado.netutil.bind_sockets(port, "127.0.0.1", family=socket.AF_INET)
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    print(f"LISTENING {sockets[0].getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        server.stop()
        await manager.shutdown()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
