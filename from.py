import socket, sys
host, sport = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sport: s.bind(("0.0.0.0", sport))
s.connect((host, 9253)); s.sendall(b"GET /v1/resolutions?workload=cgroup%3D/adv-helper-120/work HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
d=b""
while True:
    c=s.recv(65536)
    if not c: break
    d+=c
print(d.split(b"\r\n")[0].decode(), d.split(b"\r\n\r\n",1)[1][:120])
