"""A headless Chromium driven over the Chrome DevTools Protocol, with the standard library only.

The browser test (tests/test_serve.py) and the README screenshot use it: start Debian's `chromium`
binary on a page, then evaluate JavaScript in it and read back values, or capture a PNG. No Selenium,
no Playwright, no downloaded browser: CDP is JSON messages over one WebSocket, and the client side of
a WebSocket (RFC 6455) is a handshake plus masked frames, written out below.

    with Browser("http://127.0.0.1:8000/") as b:
        b.eval("document.title")                      # -> the value, by JSON
        b.wait("document.querySelector('.assistant') !== null")
        open("page.png", "wb").write(b.screenshot())

Command line (the README's screenshot): python tests/cdp.py URL OUT.png --ask "question" [--lang zh]
"""
import base64
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time


def find_chromium():
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Browser:
    def __init__(self, url, width=1000, height=700, timeout=20.0):
        exe = find_chromium()
        if exe is None:
            raise FileNotFoundError("no chromium binary on PATH (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="cdp_")
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--disable-extensions", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._devtools_port(timeout)
            target = self._page_target(port, timeout)
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            self._handshake(target["webSocketDebuggerUrl"].split(f":{port}", 1)[1])
        except BaseException:
            self.close()
            raise
        self.next_id = 0

    # -- start-up: Chromium writes the port it picked into DevToolsActivePort in the profile
    def _devtools_port(self, timeout):
        path, end = os.path.join(self.profile, "DevToolsActivePort"), time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode} before opening DevTools")
            try:
                with open(path) as f:
                    return int(f.readline())
            except (OSError, ValueError):
                time.sleep(0.05)
        raise TimeoutError("chromium did not open its DevTools port")

    def _page_target(self, port, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/json/list")
            pages = [t for t in json.loads(conn.getresponse().read()) if t.get("type") == "page"]
            conn.close()
            if pages:
                return pages[0]
            time.sleep(0.05)
        raise TimeoutError("chromium opened no page")

    # -- WebSocket, client side
    def _handshake(self, path):
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("chromium closed the WebSocket handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")
        self.buf = head.split(b"\r\n\r\n", 1)[1]

    def _send(self, text):
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        head = bytes([0x81])  # FIN + text frame
        if n < 126:
            head += bytes([0x80 | n])  # 0x80: the client must mask every frame
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("chromium closed the WebSocket")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _recv(self):
        """One whole message (continuation frames joined); the server's frames are not masked."""
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            if b0 & 0x0F in (0x1, 0x0):  # text, or a continuation of it
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    # -- CDP
    def call(self, method, **params):
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events (no "id") arrive in between: we subscribed to none, so skip them
            msg = json.loads(self._recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JavaScript error in {expression!r:.80}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression, timeout=20.0):
        """Poll a JavaScript condition until it is truthy; returns its value."""
        end, error = time.monotonic() + timeout, None
        while time.monotonic() < end:
            try:
                value = self.eval(expression)
            except RuntimeError as e:  # e.g. the element is not there yet while the page loads
                value, error = None, e
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {expression}" + (f" (last error: {error})" if error else ""))

    def screenshot(self):
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self):
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ask(browser, question, timeout=60.0):
    """Type a question into the web chat, send it, wait for the streamed answer to finish; returns
    the answer's text as the page shows it, or raises with the page's error message."""
    browser.wait("document.readyState === 'complete' && document.getElementById('input') !== null")
    n = browser.eval("document.querySelectorAll('.msg').length")
    # click() runs the page's send(), which disables the button before its first await
    assert browser.eval(f"document.getElementById('input').value = {json.dumps(question)};"
                        "document.getElementById('send').click(); document.getElementById('send').disabled")
    browser.wait("!document.getElementById('send').disabled", timeout)
    last = browser.eval(f"[...document.querySelectorAll('.msg')].slice({n}).map(e => [e.className, e.textContent])")
    if not last or last[-1][0] != "msg assistant":
        raise RuntimeError(f"the page answered {last}")
    return last[-1][1]


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Screenshot the web chat answering a question.")
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("--ask", action="append", default=[], help="question(s) to type, in order")
    p.add_argument("--lang", default="en", choices=["en", "zh"])
    p.add_argument("--system", default="")
    a = p.parse_args()
    with Browser(a.url, width=960, height=640) as b:
        b.wait("document.getElementById('lang') !== null")
        b.eval(f"document.getElementById('lang').value = '{a.lang}';"
               "document.getElementById('lang').dispatchEvent(new Event('change'));"
               f"document.getElementById('system').value = {json.dumps(a.system)}")
        for q in a.ask:
            print(q, "->", ask(b, q))
        png = b.screenshot()
    with open(a.out, "wb") as f:
        f.write(png)
    print(f"wrote {a.out} ({len(png) / 1024:.0f} KiB)")
