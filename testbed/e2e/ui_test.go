package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// artifactsEnv names the directory for test artifacts such as screenshots; default test-artifacts
// at the top of the repository, which git ignores.
const artifactsEnv = "EDS_TEST_ARTIFACTS"

func artifactPath(t *testing.T, name string) string {
	t.Helper()
	dir := os.Getenv(artifactsEnv)
	if dir == "" {
		dir = filepath.Join("..", "..", "test-artifacts")
	}
	dir, err := filepath.Abs(dir)
	if err == nil {
		err = os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		t.Fatalf("artifacts directory: %v", err)
	}
	return filepath.Join(dir, name)
}

// TestE2EUI is the operator's view of a real stack (dockerd running the shim, the server, Envoy
// with its UI) with a load running on three services: web (http, 1 in 10 requests a 503, each
// answered 5 ms late), db (tcp) and dns (udp, which the shim carries). In headless Chromium, in
// real time, the UI shows the web port's request rate, error rate and latency, its container's
// name and image, and the udp port with its container and a rate; once the 1,000 datagrams of
// the udp load are through, the udp row counts 1,000 in and 1,000 out. A screenshot of the page
// under load is written to test-artifacts/ (EDS_TEST_ARTIFACTS).
func TestE2EUI(t *testing.T) {
	testbed.ChromiumBinary(t)
	uiPort := testbed.FreePort(t)
	s := startOpts(t, testbed.Generations(t)[0], stack.Options{UIPort: uiPort})
	d := s.daemon
	webPort, dbPort, dnsPort := testbed.FreePort(t), testbed.FreePort(t), testbed.FreePort(t)
	web := d.Run(t, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:80", webPort)},
		Labels: map[string]string{"ServiceName": "web", "EnvironmentName": "ui"}})
	db := d.Run(t, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:7", dbPort)},
		Labels: map[string]string{"ServiceName": "db", "EnvironmentName": "ui", "ProxyMode": "tcp"}})
	dns := d.Run(t, testbed.RunOptions{Publish: []string{fmt.Sprintf("127.0.0.1:%d:7/udp", dnsPort)},
		Labels: map[string]string{"ServiceName": "dns", "EnvironmentName": "ui"}})
	webAddr, dbAddr, dnsAddr := fmt.Sprintf("127.0.0.1:%d", webPort), fmt.Sprintf("127.0.0.1:%d", dbPort), fmt.Sprintf("127.0.0.1:%d", dnsPort)

	// The load: bounded in time and, for udp, in count.
	ctx, stopLoad := context.WithTimeout(context.Background(), 2*time.Minute)
	var wg sync.WaitGroup
	var mu sync.Mutex
	loadErrs := map[string]error{}
	fail := func(what string, err error) {
		mu.Lock()
		defer mu.Unlock()
		if _, ok := loadErrs[what]; !ok && ctx.Err() == nil {
			loadErrs[what] = err
		}
	}
	t.Cleanup(func() {
		stopLoad()
		wg.Wait()
	})
	wg.Add(3)
	go func() { // web: about 100 requests a second
		defer wg.Done()
		client := testbed.HTTPClient()
		for i := 0; ctx.Err() == nil; i++ {
			url := fmt.Sprintf("http://%s/load/%d?delay=5ms", webAddr, i)
			want := http.StatusOK
			if i%10 == 9 {
				url, want = url+"&status=503", http.StatusServiceUnavailable
			}
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
			resp, err := client.Do(req)
			if err != nil {
				fail("web", err)
				continue
			}
			resp.Body.Close()
			if resp.StatusCode != want {
				fail("web", fmt.Errorf("%s: %s", url, resp.Status))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	go func() { // db: a connection every 50 ms
		defer wg.Done()
		for ctx.Err() == nil {
			if got, err := testbed.TCPEcho(ctx, dbAddr, []byte("ping")); err != nil || string(got) != "ping" {
				fail("db", fmt.Errorf("%q %v", got, err))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	const datagrams = 1000
	udpDone := make(chan struct{})
	go func() { // dns: 1,000 round trips on one flow, over about 30 s
		defer wg.Done()
		defer close(udpDone)
		conn, err := testbed.Dial(ctx, "udp", dnsAddr)
		if err != nil {
			fail("dns", err)
			return
		}
		defer conn.Close()
		buf := make([]byte, 256)
		for i := range datagrams {
			msg := fmt.Sprintf("query %d", i)
			conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := conn.Write([]byte(msg)); err != nil {
				fail("dns", err)
				return
			}
			if n, err := conn.Read(buf); err != nil || string(buf[:n]) != msg {
				fail("dns", fmt.Errorf("datagram %d: %q %v", i, buf[:n], err))
				return
			}
			time.Sleep(30 * time.Millisecond)
		}
	}()

	page := testbed.Browse(t, fmt.Sprintf("http://127.0.0.1:%d/", uiPort), 1700, 800, 3*time.Minute)
	cells := func(table, attr, value string) map[string]string {
		t.Helper()
		js := fmt.Sprintf(`(() => {
			const tr = document.querySelector(%q);
			if (!tr) return {};
			const c = {};
			for (const td of tr.querySelectorAll("td[data-col]")) {
				const svg = td.querySelector("svg");
				c[td.dataset.col] = svg ? svg.dataset.points + " points" : td.textContent;
			}
			return c;
		})()`, fmt.Sprintf(`#%s tr[%s=%q]`, table, attr, value))
		got, err := chromedp.Run(page, chromedp.Evaluate[map[string]string](js))
		if err != nil {
			t.Fatalf("reading the page: %v", err)
		}
		return got
	}
	number := func(text string) float64 {
		f, err := strconv.ParseFloat(strings.Fields(text + " x")[0], 64)
		if err != nil {
			return 0
		}
		return f
	}

	// Under load: rates need two refreshes (udp: two reports of its shim), latency Envoy's first
	// 5-second interval, and a trend worth a look (the screenshot's) some 20 seconds.
	var webRow, webService, dnsRow map[string]string
	testbed.WaitFor(t, 60*time.Second, "the UI showing rates, latency and trends under load", func() error {
		webRow, webService, dnsRow = cells("ports", "data-published", webAddr), cells("services", "data-service", "web-ui"), cells("ports", "data-published", dnsAddr)
		switch {
		case number(webRow["rate"]) <= 0 || number(webRow["r5xx"]) <= 0:
			return fmt.Errorf("web port: rate %q, 5xx %q", webRow["rate"], webRow["r5xx"])
		case number(webRow["p50"]) <= 0:
			return fmt.Errorf("web port: p50 %q", webRow["p50"])
		case number(dnsRow["rate"]) <= 0:
			return fmt.Errorf("dns port: rate %q", dnsRow["rate"])
		case number(webRow["trend"]) < 10:
			return fmt.Errorf("web port: trend of %q", webRow["trend"])
		}
		return nil
	})
	shot, err := chromedp.Run(page, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	path := artifactPath(t, "ui-under-load.png")
	if err := os.WriteFile(path, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot of the UI under load: %s", path)
	rows, _ := json.MarshalIndent(map[string]any{"web port": webRow, "web service": webService, "dns port": dnsRow}, "", "  ")
	t.Logf("what the page showed:\n%s", rows)

	for _, tc := range []struct {
		row       map[string]string
		col, want string
	}{
		{webRow, "mode", "http"}, {webRow, "service", "web-ui"},
		{webRow, "container_name", web.Name}, {webRow, "image", testbed.EchoImageTag},
		{webService, "containers", web.Name}, {webService, "images", testbed.EchoImageTag},
		{dnsRow, "mode", "udp"}, {dnsRow, "service", "dns-ui"}, {dnsRow, "container_name", dns.Name},
		{dnsRow, "container", fmt.Sprintf("%s:7", dns.IP)},
		{cells("ports", "data-published", dbAddr), "container_name", db.Name},
	} {
		if tc.row[tc.col] != tc.want {
			t.Errorf("cell %s = %q, want %q (row %q)", tc.col, tc.row[tc.col], tc.want, tc.row)
		}
	}
	// The web container answers 5 ms late: its latency is at least that.
	if p50, p99 := number(webRow["p50"]), number(webRow["p99"]); p50 < 4 || p99 < p50 || !strings.HasSuffix(webRow["p50"], " ms") {
		t.Errorf("web latency p50 %q p99 %q, want at least 5 ms", webRow["p50"], webRow["p99"])
	}
	// 1 request in 10 is a 503.
	if r2, r5 := number(webRow["r2xx"]), number(webRow["r5xx"]); r5 <= 0 || r2 < 3*r5 {
		t.Errorf("web 2xx %q/s and 5xx %q/s, want about 9 to 1", webRow["r2xx"], webRow["r5xx"])
	}
	// Sortable: a click on Rate puts the busiest port first, a second click last.
	for _, wantDesc := range []bool{true, false} {
		order, err := chromedp.Run(page, chromedp.Evaluate[[]string](`(() => {
			document.querySelector("#ports th[data-key=rate]").click();
			return [...document.querySelectorAll("#ports tbody td[data-col=rate]")].map(td => td.textContent);
		})()`))
		if err != nil {
			t.Fatal(err)
		}
		for i := 1; i < len(order); i++ {
			if a, b := number(order[i-1]), number(order[i]); (wantDesc && a < b) || (!wantDesc && a > b) || len(order) != 3 {
				t.Errorf("sorted by rate (descending: %v): %q", wantDesc, order)
				break
			}
		}
	}
	if number(cells("ports", "data-published", dbAddr)["rate"]) <= 0 {
		t.Errorf("db port: no connection rate: %q", cells("ports", "data-published", dbAddr))
	}

	select {
	case <-udpDone:
	case <-time.After(60 * time.Second):
		t.Fatal("the udp load did not finish")
	}
	want := fmt.Sprintf("%d in · %d out", datagrams, datagrams)
	testbed.WaitFor(t, 20*time.Second, "the udp row counting every datagram", func() error {
		if got := cells("ports", "data-published", dnsAddr)["total"]; got != want {
			return fmt.Errorf("udp total %q, want %q", got, want)
		}
		return nil
	})
	stopLoad()
	wg.Wait()
	for what, err := range loadErrs {
		t.Errorf("%s load: %v", what, err)
	}
}
