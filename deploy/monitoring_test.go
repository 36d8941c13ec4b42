package deploy_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"

	"github.com/envoy-docker-shim/envoy-docker-shim/envoy/bootstrap"
	"github.com/envoy-docker-shim/envoy-docker-shim/services/server"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed"
	"github.com/envoy-docker-shim/envoy-docker-shim/testbed/stack"
)

const (
	dashboardPath = "grafana/envoy-docker-shim.json"
	scrapePath    = "prometheus/prometheus.yml"
	// serviceMarker stands for the dashboard's $service variable while its queries are parsed, so
	// that the matchers that select a service can be told from the others.
	serviceMarker = "__service__"
)

// dashboard is what the tests read of Grafana's dashboard JSON.
type dashboard struct {
	UID        string  `json:"uid"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"`
	Templating struct {
		List []struct {
			Name       string `json:"name"`
			Type       string `json:"type"`
			Definition string `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	ID         int     `json:"id"`
	Type       string  `json:"type"`
	Title      string  `json:"title"`
	Panels     []panel `json:"panels"` // a collapsed row's
	Datasource *struct {
		UID string `json:"uid"`
	} `json:"datasource"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

// selector is one metric a query reads, and the label its $service matcher is on ("" for none).
type selector struct{ metric, serviceLabel string }

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	b, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	return d
}

// selectors parses every PromQL query of the dashboard (panels and the service variable) and
// returns the metrics they read.
func selectors(t *testing.T, d dashboard) []selector {
	t.Helper()
	var queries []string
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			for _, target := range p.Targets {
				queries = append(queries, target.Expr)
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		// Grafana's label_values(metric, label): the metric is a selector of its own.
		inner, ok := strings.CutPrefix(v.Definition, "label_values(")
		metric, _, found := strings.Cut(inner, ",")
		if !ok || !found {
			t.Fatalf("variable %s: query %q is not label_values(metric, label)", v.Name, v.Definition)
		}
		queries = append(queries, strings.TrimSpace(metric))
	}
	seen := map[selector]bool{}
	var out []selector
	for _, q := range queries {
		expr := strings.NewReplacer("$__rate_interval", "5m", "$service", serviceMarker).Replace(q)
		if strings.Contains(expr, "$") {
			t.Errorf("query %q uses a variable the dashboard does not define", q)
			continue
		}
		parsed, err := parser.ParseExpr(expr)
		if err != nil {
			t.Errorf("query %q: %v", q, err)
			continue
		}
		parser.Inspect(parsed, func(node parser.Node, _ []parser.Node) error {
			vs, ok := node.(*parser.VectorSelector)
			if !ok {
				return nil
			}
			s := selector{metric: vs.Name}
			for _, m := range vs.LabelMatchers {
				if m.Value == serviceMarker && m.Type == labels.MatchRegexp {
					s.serviceLabel = m.Name
				}
			}
			if s.metric == "" {
				t.Errorf("query %q selects series without naming a metric", q)
			}
			if !seen[s] {
				seen[s] = true
				out = append(out, s)
			}
			return nil
		})
	}
	return out
}

// TestDashboard: the dashboard is one Grafana dashboard whose every panel reads the Prometheus
// data source chosen on import, and whose every query is valid PromQL.
func TestDashboard(t *testing.T) {
	d := loadDashboard(t)
	if d.UID == "" || d.Title == "" {
		t.Errorf("dashboard without uid or title: %q %q", d.UID, d.Title)
	}
	ids := map[int]bool{}
	var check func([]panel)
	check = func(ps []panel) {
		for _, p := range ps {
			if ids[p.ID] {
				t.Errorf("panel id %d twice", p.ID)
			}
			ids[p.ID] = true
			if p.Type != "row" && (p.Datasource == nil || p.Datasource.UID != "${datasource}" || len(p.Targets) == 0) {
				t.Errorf("panel %q: no query, or not on the ${datasource} variable", p.Title)
			}
			check(p.Panels)
		}
	}
	check(d.Panels)
	sels := selectors(t, d)
	if len(sels) < 10 {
		t.Errorf("only %d metrics in the dashboard's queries: %v", len(sels), sels)
	}
	for _, s := range sels {
		if !strings.HasPrefix(s.metric, "envoy_") && !strings.HasPrefix(s.metric, "eds_") {
			t.Errorf("query reads %s, which neither Envoy (envoy_) nor the server (eds_) exports", s.metric)
		}
	}
}

// scrapeConfig is what the tests read of Prometheus's configuration.
type scrapeConfig struct {
	Global        map[string]any `json:"global"`
	ScrapeConfigs []struct {
		JobName       string `json:"job_name"`
		MetricsPath   string `json:"metrics_path"`
		StaticConfigs []struct {
			Targets []string `json:"targets"`
		} `json:"static_configs"`
	} `json:"scrape_configs"`
}

func loadScrapeConfig(t *testing.T) (scrapeConfig, []byte) {
	t.Helper()
	b, err := os.ReadFile(scrapePath)
	if err != nil {
		t.Fatal(err)
	}
	var c scrapeConfig
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		t.Fatalf("%s: %v", scrapePath, err)
	}
	return c, b
}

// job returns the metrics path and target of a job of the scrape configuration.
func job(t *testing.T, c scrapeConfig, name string) (path, target string) {
	t.Helper()
	for _, j := range c.ScrapeConfigs {
		if j.JobName == name && len(j.StaticConfigs) == 1 && len(j.StaticConfigs[0].Targets) == 1 {
			return j.MetricsPath, j.StaticConfigs[0].Targets[0]
		}
	}
	t.Fatalf("%s has no job %s with one target", scrapePath, name)
	return "", ""
}

// defaultOf is the envconfig default of the field of v that reads variable.
func defaultOf(t *testing.T, v any, variable string) string {
	t.Helper()
	typ := reflect.TypeOf(v)
	for i := range typ.NumField() {
		if typ.Field(i).Tag.Get("envconfig") == variable {
			return typ.Field(i).Tag.Get("default")
		}
	}
	t.Fatalf("%T has no variable %s", v, variable)
	return ""
}

// TestScrapeConfig: the shipped scrape configuration points at the appliance's default addresses
// and paths, and the README shows it as it is.
func TestScrapeConfig(t *testing.T) {
	c, raw := loadScrapeConfig(t)
	path, target := job(t, c, "envoy-docker-shim-envoy")
	ui := net.JoinHostPort(defaultOf(t, bootstrap.Config{}, "ENVOY_UI_ADDRESS"), defaultOf(t, bootstrap.Config{}, "ENVOY_UI_LISTEN_PORT"))
	if path != "/stats/prometheus" || target != ui {
		t.Errorf("Envoy's job scrapes %s%s, want %s/stats/prometheus (the UI's defaults)", target, path, ui)
	}
	path, target = job(t, c, "envoy-docker-shim-server")
	if addr := defaultOf(t, server.Config{}, "EDS_HTTP_ADDR"); path != "/metrics" || target != addr {
		t.Errorf("the server's job scrapes %s%s, want %s/metrics (EDS_HTTP_ADDR's default)", target, path, addr)
	}
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(readme), "```yaml\n"+string(raw)+"```\n") {
		t.Errorf("README.md does not show %s as it is; copy it into the Monitoring section", scrapePath)
	}
}

// scrape reads one Prometheus endpoint and returns the series names it exports (a histogram's
// _bucket, _sum and _count), each with the label sets of its series.
func scrape(t *testing.T, url string) map[string][]map[string]string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := testbed.HTTPClient().Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s %v", url, resp.Status, err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	out := map[string][]map[string]string{}
	for name, f := range families {
		names := []string{name}
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM:
			names = []string{name + "_bucket", name + "_sum", name + "_count"}
		case dto.MetricType_SUMMARY:
			names = []string{name, name + "_sum", name + "_count"}
		}
		for _, m := range f.GetMetric() {
			ls := map[string]string{}
			for _, l := range m.GetLabel() {
				ls[l.GetName()] = l.GetValue()
			}
			for _, n := range names {
				out[n] = append(out[n], ls)
			}
		}
	}
	return out
}

// TestE2EDashboardMetricsExported: every metric the dashboard's queries read is exported by a
// running appliance (a real Envoy and the server, scraped where the shipped scrape configuration
// says), after some traffic through an http-mode and a tcp-mode service; and a query that selects
// a service by a label finds that service under that label.
func TestE2EDashboardMetricsExported(t *testing.T) {
	testbed.RequireDocker(t)
	sels := selectors(t, loadDashboard(t))
	c, _ := loadScrapeConfig(t)
	envoyPath, _ := job(t, c, "envoy-docker-shim-envoy")
	serverPath, _ := job(t, c, "envoy-docker-shim-server")

	daemon := testbed.StartDaemon(t, testbed.DaemonOptions{})
	web := daemon.Run(t, testbed.RunOptions{Labels: map[string]string{"ServiceName": "dash-web", "EnvironmentName": "test"}})
	db := daemon.Run(t, testbed.RunOptions{Labels: map[string]string{"ServiceName": "dash-db", "EnvironmentName": "test", "ProxyMode": "tcp"}})
	uiPort := testbed.FreePort(t)
	st := stack.Start(t, stack.Options{DockerHost: daemon.Host, UIPort: uiPort})
	services := []string{"dash-web-test", "dash-db-test"}

	httpPort, tcpPort := testbed.FreePort(t), testbed.FreePort(t)
	for _, m := range []struct {
		port    int
		c       *testbed.Container
		service string
		cport   int
	}{{httpPort, web, services[0], 80}, {tcpPort, db, services[1], 7}} {
		resp, _ := st.Register(t, stack.TCP(m.port, m.c.IP.String(), m.cport))
		if got := resp.GetReady().GetRegistration().GetService(); got != m.service {
			t.Fatalf("registration of %s: %v", m.service, resp)
		}
	}
	const requests = 20
	for range requests {
		if status, body, err := testbed.HTTPGet(context.Background(), fmt.Sprintf("http://127.0.0.1:%d/", httpPort)); err != nil || status != http.StatusOK {
			t.Fatalf("GET: %d %q %v", status, body, err)
		}
		if got, err := testbed.TCPEcho(context.Background(), "127.0.0.1:"+strconv.Itoa(tcpPort), []byte("ping")); err != nil || string(got) != "ping" {
			t.Fatalf("TCP echo: %q %v", got, err)
		}
	}

	envoyURL := fmt.Sprintf("http://127.0.0.1:%d%s", uiPort, envoyPath)
	serverURL := "http://" + st.Config.HTTPAddr + serverPath
	// Envoy merges its workers' histograms into what the admin interface shows at each stats
	// flush (every 5 s): until then the traffic's latencies are not in the scrape.
	var missing []string
	testbed.WaitFor(t, 15*time.Second, "Envoy's histograms of the traffic", func() error {
		exported := scrape(t, envoyURL)
		for _, s := range exported["envoy_http_downstream_rq_time_count"] {
			if s["envoy_http_conn_manager_prefix"] == services[0] {
				return nil
			}
		}
		return fmt.Errorf("no envoy_http_downstream_rq_time for %s yet", services[0])
	})
	exported := scrape(t, envoyURL)
	for name, series := range scrape(t, serverURL) {
		exported[name] = append(exported[name], series...)
	}
	for _, s := range sels {
		series, ok := exported[s.metric]
		if !ok {
			missing = append(missing, s.metric)
			continue
		}
		if s.serviceLabel == "" {
			continue
		}
		if !slices.ContainsFunc(series, func(ls map[string]string) bool { return slices.Contains(services, ls[s.serviceLabel]) }) {
			t.Errorf("%s has no series with %s naming a service (%v): the dashboard's filter would show nothing", s.metric, s.serviceLabel, services)
		}
	}
	if len(missing) > 0 {
		t.Errorf("the dashboard reads metrics the appliance does not export: %v", missing)
	}
	t.Logf("%d metrics of the dashboard checked against %s and %s", len(sels), envoyURL, serverURL)
}
