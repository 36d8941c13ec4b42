package testbed

import (
	"context"
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// ChromiumBinary returns $CHROMIUM_BIN, or else Debian's chromium, and skips the test (fails it
// under CI=true) if there is none.
func ChromiumBinary(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("CHROMIUM_BIN"); p != "" {
		if err := checkExecutable(p); err != nil {
			missing(t, fmt.Sprintf("CHROMIUM_BIN: %v", err), "point CHROMIUM_BIN at a Chromium binary")
		}
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := lookTool(name); err == nil {
			return p
		}
	}
	missing(t, "no Chromium for the UI tests", provisionHint+" (Debian package chromium)")
	return ""
}

// RenderPage loads a page of ours on loopback in headless Chromium, lets its scripts run for
// budget (virtual time: fetches complete first) and returns the DOM as HTML.
func RenderPage(t testing.TB, pageURL string, budget time.Duration) string {
	t.Helper()
	bin := ChromiumBinary(t)
	u, err := url.Parse(pageURL)
	if err != nil {
		t.Fatal(err)
	}
	ip, err := netip.ParseAddr(u.Hostname())
	if err != nil || !ip.IsLoopback() {
		t.Fatalf("RenderPage %s: %v: pages are loaded from loopback only", pageURL, ErrForbiddenTarget)
	}
	ctx, cancel := context.WithTimeout(context.Background(), budget+60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin,
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		// Nothing but the page: no update checks, sync, metrics or other background traffic.
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-default-apps", "--disable-extensions", "--no-first-run", "--disable-domain-reliability",
		"--user-data-dir="+t.TempDir(),
		fmt.Sprintf("--virtual-time-budget=%d", budget.Milliseconds()),
		"--dump-dom", pageURL)
	cmd.Env = toolEnv("HOME=" + t.TempDir())
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium --dump-dom %s: %v\n%s", pageURL, err, stderr.String())
	}
	return string(out)
}
