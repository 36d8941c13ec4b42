package bootstrap_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	pb "github.com/envoy-docker-shim/envoy-docker-shim/services/registration/registrationpb"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

// TestUI runs the appliance's own bootstrap in a real Envoy with the UI on, serving two published
// ports of one service that have carried three requests and one: the page lists each port with
// its service, container and its own counts, and the service with both (rendered in a real
// browser); the endpoints the page reads answer, the server's /ports included; nothing else of
// the admin interface, or of the server, is reachable through the UI port, not even by GET.
func TestUI(t *testing.T) {
	uiPort := testbed.FreePort(t)
	st := stack.Start(t, stack.Options{UIPort: uiPort})
	upstream := stack.LoopbackHTTP(t)
	hostPort, otherPort := testbed.FreePort(t), testbed.FreePort(t)
	if hostPort > otherPort { // rows are sorted by address
		hostPort, otherPort = otherPort, hostPort
	}
	var reg, other *pb.Registration
	for _, r := range []struct {
		port     int
		reg      **pb.Registration
		requests int
	}{{hostPort, &reg, 3}, {otherPort, &other, 1}} {
		resp, _ := st.Register(t, stack.TCP(r.port, "127.0.0.1", upstream))
		if *r.reg = resp.GetReady().GetRegistration(); *r.reg == nil {
			t.Fatalf("not ready: %v", resp)
		}
		for range r.requests {
			if status, _, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", r.port)); err != nil || status != 200 {
				t.Fatalf("through the published port: %d %v", status, err)
			}
		}
	}
	ui := fmt.Sprintf("http://127.0.0.1:%d", uiPort)

	t.Run("read-only endpoints", func(t *testing.T) {
		for _, tc := range []struct {
			path, contentType, want string
		}{
			{"/", "text/html", "<title>envoy-docker-shim</title>"},
			{"/stats?format=json&filter=%5Ehttp%5C.", "application/json", fmt.Sprintf(`"http.%s.downstream_rq_total"`, reg.GetService())},
			{"/stats/prometheus", "text/plain", "envoy_http_downstream_rq_total"},
			{"/clusters?format=json", "application/json", reg.GetCluster()},
			{"/config_dump?resource=dynamic_listeners", "application/json", reg.GetListener()},
			{"/ports", "application/json", fmt.Sprintf(`"listener":%q`, reg.GetListener())},
		} {
			status, ct, body := get(t, http.MethodGet, ui+tc.path)
			if status != 200 || !strings.HasPrefix(ct, tc.contentType) || !strings.Contains(body, tc.want) {
				t.Errorf("GET %s: %d %q, body lacks %q:\n%.300s", tc.path, status, ct, tc.want, body)
			}
		}
	})

	t.Run("the rest of the admin interface is not there", func(t *testing.T) {
		for _, tc := range []struct{ method, path string }{
			{http.MethodPost, "/quitquitquit"}, {http.MethodGet, "/quitquitquit"},
			{http.MethodPost, "/healthcheck/fail"}, {http.MethodPost, "/logging?level=trace"},
			{http.MethodPost, "/runtime_modify?x=1"}, {http.MethodPost, "/drain_listeners"},
			{http.MethodPost, "/reset_counters"}, {http.MethodPost, "/stats"}, {http.MethodGet, "/certs"},
			{http.MethodGet, "/stats/../quitquitquit"},
			// The server's other endpoints stay on its own loopback address.
			{http.MethodGet, "/metrics"}, {http.MethodGet, "/registrations"}, {http.MethodGet, "/healthz"}, {http.MethodPost, "/ports"},
		} {
			if status, _, body := get(t, tc.method, ui+tc.path); status != 404 {
				t.Errorf("%s %s through the UI: %d %.200s", tc.method, tc.path, status, body)
			}
		}
		if v, ok := st.Envoy.Stat(t, fmt.Sprintf("http.%s.downstream_rq_total", reg.GetService())); !ok || v != 4 {
			t.Errorf("after the attempts Envoy counts %d requests (%v): were counters reset?", v, ok)
		}
		if status, _, _ := get(t, http.MethodGet, "http://"+st.Envoy.AdminAddr+"/ready"); status != 200 {
			t.Error("Envoy is not ready any more")
		}
	})

	t.Run("the page in a browser", func(t *testing.T) {
		dom := testbed.RenderPage(t, ui+"/", 5*time.Second)
		row := func(table, attr, value string) map[string]string {
			t.Helper()
			body := regexp.MustCompile(`(?s)<table id="` + table + `">.*?</table>`).FindString(dom)
			tr := regexp.MustCompile(`(?s)<tr [^>]*` + attr + `="` + regexp.QuoteMeta(value) + `"[^>]*>(.*?)</tr>`).FindStringSubmatch(body)
			if tr == nil {
				t.Fatalf("no row with %s=%q in the %s table of the rendered page:\n%s", attr, value, table, dom)
			}
			cells := map[string]string{}
			for _, c := range regexp.MustCompile(`<td data-col="([^"]+)"[^>]*>([^<]*)`).FindAllStringSubmatch(tr[1], -1) {
				cells[c[1]] = c[2]
			}
			return cells
		}
		// Each port its own count; the service both ports'.
		for _, tc := range []struct {
			cells map[string]string
			want  map[string]string
		}{
			{row("ports", "data-listener", reg.GetListener()), map[string]string{"published": fmt.Sprintf("127.0.0.1:%d", hostPort), "mode": "http",
				"service": reg.GetService(), "container": fmt.Sprintf("127.0.0.1:%d", upstream), "total": "3", "open": "0"}},
			{row("ports", "data-listener", other.GetListener()), map[string]string{"published": fmt.Sprintf("127.0.0.1:%d", otherPort), "mode": "http",
				"service": reg.GetService(), "container": fmt.Sprintf("127.0.0.1:%d", upstream), "total": "1", "open": "0"}},
			{row("services", "data-service", reg.GetService()), map[string]string{"service": reg.GetService(), "mode": "http", "ports": "2",
				"containers": fmt.Sprintf("127.0.0.1:%d", upstream), "total": "4"}},
		} {
			for k, w := range tc.want {
				if tc.cells[k] != w {
					t.Errorf("cell %s = %q, want %q (row %q)", k, tc.cells[k], w, tc.cells)
				}
			}
		}
		if !strings.Contains(dom, "2 published ports") {
			t.Errorf("status line missing:\n%s", dom)
		}
	})
}

func get(t *testing.T, method, url string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") && resp.StatusCode == 200 && !json.Valid(b) {
		t.Errorf("%s %s: invalid JSON", method, url)
	}
	return resp.StatusCode, resp.Header.Get("Content-Type"), string(b)
}
