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

	"github.com/chromedp/chromedp"
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
	missing(t, "no Chromium for the UI tests", ProvisionHint+" (Debian package chromium)")
	return ""
}

// RenderPage loads a page of ours on loopback in headless Chromium, lets its scripts run for
// budget (virtual time: fetches complete first) and returns the DOM as HTML.
func RenderPage(t testing.TB, pageURL string, budget time.Duration) string {
	t.Helper()
	bin := ChromiumBinary(t)
	requireLoopbackPage(t, pageURL)
	ctx, cancel := context.WithTimeout(context.Background(), budget+60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append(chromiumFlags(t.TempDir()),
		fmt.Sprintf("--virtual-time-budget=%d", budget.Milliseconds()),
		"--dump-dom", pageURL)...)
	cmd.Env = toolEnv("HOME=" + t.TempDir())
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium --dump-dom %s: %v\n%s", pageURL, err, stderr.String())
	}
	return string(out)
}

// chromiumFlags run Chromium headless with a fresh profile in dir and nothing but the page: no
// update checks, sync, metrics or other background traffic.
func chromiumFlags(dir string) []string {
	return []string{
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--disable-default-apps", "--disable-extensions", "--no-first-run", "--disable-domain-reliability",
		"--user-data-dir=" + dir,
	}
}

func requireLoopbackPage(t testing.TB, pageURL string) {
	t.Helper()
	u, err := url.Parse(pageURL)
	if err != nil {
		t.Fatal(err)
	}
	ip, err := netip.ParseAddr(u.Hostname())
	if err != nil || !ip.IsLoopback() {
		t.Fatalf("%s: %v: pages are loaded from loopback only", pageURL, ErrForbiddenTarget)
	}
}

// Browse opens a page of ours on loopback in headless Chromium, driven over the DevTools protocol
// (chromedp), in real time: the page's timers and fetches run as in a user's browser, which
// RenderPage's virtual time does not give a page that measures rates. It returns the chromedp
// context for the test's actions (chromedp.Run or chromedp.Do on it); the browser stops when the test ends,
// and in any case after timeout.
func Browse(t testing.TB, pageURL string, width, height int, timeout time.Duration) context.Context {
	t.Helper()
	bin := ChromiumBinary(t)
	requireLoopbackPage(t, pageURL)
	opts := []chromedp.ExecAllocatorOption{chromedp.ExecPath(bin), chromedp.WindowSize(width, height),
		chromedp.ModifyCmdFunc(func(cmd *exec.Cmd) { cmd.Env = toolEnv("HOME=" + t.TempDir()) })}
	for _, f := range chromiumFlags(t.TempDir()) {
		name, value, ok := strings.Cut(strings.TrimPrefix(f, "--"), "=")
		if !ok {
			opts = append(opts, chromedp.Flag(name, true))
		} else {
			opts = append(opts, chromedp.Flag(name, value))
		}
	}
	ctx, cancelTimeout := context.WithTimeout(context.Background(), timeout)
	ctx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	ctx, cancelBrowser := chromedp.NewContext(ctx)
	t.Cleanup(func() { cancelBrowser(); cancelAlloc(); cancelTimeout() })
	if err := chromedp.Do(ctx, chromedp.Navigate(pageURL)); err != nil {
		t.Fatalf("chromium: open %s: %v", pageURL, err)
	}
	return ctx
}
