"""Drives the control plane's dashboard in headless Chromium (Debian's chromium and
chromedriver, through selenium; nothing is downloaded) for tests/tests/dashboard.rs.

  dashboard.py URL TOKEN SCREENSHOT_DIR EVENT_ID TEXT...

Checks, printing one line per step and exiting 1 on the first failure:
1. without a token the page asks for one; a wrong one is refused with the reason;
2. with the token (in the link's fragment) the board shows every TEXT (services, the edge,
   the convergence table) — then prints `ready` and waits for the event EVENT_ID, published by
   the test, to appear in the live tail;
3. screenshots at 1280x800 and at a phone's 390x844 (where nothing overflows sideways);
4. no request of the page left 127.0.0.1, and it followed the live feeds (SSE).
"""
import json
import sys
import time
from urllib.parse import urlparse

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, token, shots, event_id, *expect = sys.argv[1:]
origin = urlparse(url).netloc


def fail(why):
    print(f"FAIL {why}", flush=True)
    sys.exit(1)


def wait_for(what, check, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.1)
    fail(f"timed out waiting for: {what}\n--- page text:\n{driver.find_element(By.TAG_NAME, 'body').text}")


opts = Options()
opts.binary_location = "/usr/bin/chromium"
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]:
    opts.add_argument(arg)
opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
try:
    driver.set_window_size(1280, 800)
    # 1. Signing in.
    driver.get(url)
    wait_for("the sign-in form", lambda: driver.find_element(By.ID, "login").is_displayed())
    driver.find_element(By.ID, "token").send_keys("not-the-admin-token")
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait_for("a wrong token refused with the reason",
             lambda: "admin token" in driver.find_element(By.ID, "error").text)
    print("sign-in ok", flush=True)

    # 2. The board, live.
    driver.get(f"{url}#token={token}")
    wait_for("the board", lambda: driver.find_element(By.ID, "board").is_displayed())
    if "#token" in driver.current_url:
        fail("the token stayed in the address bar")
    body = lambda: driver.find_element(By.TAG_NAME, "body").text
    for text in expect:
        wait_for(f"{text!r} on the page", lambda: text in body())
    edges = driver.find_elements(By.CSS_SELECTOR, "line.edge")
    if not any(e.get_attribute("data-edge") == "gateway→market-service" for e in edges):
        fail(f"no gateway→market-service edge in the graph: {[e.get_attribute('data-edge') for e in edges]}")
    print("ready", flush=True)
    wait_for(f"event {event_id} in the live tail", lambda: event_id in driver.find_element(By.ID, "tail").text, 30)
    print("tail ok", flush=True)

    # 3. Screenshots, desktop and phone.
    driver.save_screenshot(f"{shots}/dashboard-1280x800.png")
    driver.set_window_size(390, 844)
    time.sleep(0.3)
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    if overflow > 1:
        fail(f"the page is {overflow}px wider than a phone's screen")
    driver.save_screenshot(f"{shots}/dashboard-390x844.png")
    print("screenshots ok", flush=True)

    # 4. Every request the page made stayed on the control plane's listener.
    outside, urls = [], []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg.get("method") == "Network.requestWillBeSent":
            u = msg["params"]["request"]["url"]
            urls.append(u)
            if not u.startswith("data:") and urlparse(u).netloc != origin:
                outside.append(u)
    if outside:
        fail(f"requests left the control plane: {outside}")
    print("loopback only ok", flush=True)
    # Live: the board follows the Server-Sent Events feed, the tail its topic's.
    if not any(u.endswith("/api/v1/stream") for u in urls) or not any("/tail" in u for u in urls):
        fail(f"the page did not follow the live feeds: {urls}")
    print("live ok", flush=True)
finally:
    driver.quit()
