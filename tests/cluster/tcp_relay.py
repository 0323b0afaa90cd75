"""``ProxyCommand`` for ssh: relay stdin/stdout to HOST PORT (the launcher has no ssh port option)."""
import socket
import sys
import threading

sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))


def up():
    while data := sys.stdin.buffer.raw.read(65536):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


threading.Thread(target=up, daemon=True).start()
while data := sock.recv(65536):
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
