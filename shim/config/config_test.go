package config

import (
	"os"

	"strings"
	"testing"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/envoy-docker-shim/envoy-docker-shim/internal/shimlink"
)

func TestLoad(t *testing.T) {
	for _, tc := range []struct {
		name    string
		env     map[string]string
		want    Config
		errText string
	}{
		{name: "empty environment: defaults", want: Config{ShimSocket: shimlink.DefaultSocket, Timeout: 10 * time.Second}},
		{name: "everything set", env: map[string]string{"EDS_SHIM_SOCKET": "/tmp/s.sock", "EDS_SHIM_TIMEOUT": "3s", "EDS_SCTP_PROXY": "/usr/bin/docker-proxy"},
			want: Config{ShimSocket: "/tmp/s.sock", Timeout: 3 * time.Second, SCTPProxy: "/usr/bin/docker-proxy"}},
		{name: "empty socket means default", env: map[string]string{"EDS_SHIM_SOCKET": ""}, want: Config{ShimSocket: shimlink.DefaultSocket, Timeout: 10 * time.Second}},
		{name: "timeout beyond dockerd's patience", env: map[string]string{"EDS_SHIM_TIMEOUT": "16s"}, errText: "EDS_SHIM_TIMEOUT=16s: must be more than 0 and at most 15s"},
		{name: "timeout zero", env: map[string]string{"EDS_SHIM_TIMEOUT": "0s"}, errText: "EDS_SHIM_TIMEOUT"},
		{name: "timeout not a duration", env: map[string]string{"EDS_SHIM_TIMEOUT": "10"}, errText: "EDS_SHIM_TIMEOUT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, k := range []string{"EDS_SHIM_SOCKET", "EDS_SHIM_TIMEOUT", "EDS_SCTP_PROXY"} {
				t.Setenv(k, "")
			}
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			got, err := Load()
			if tc.errText != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errText) {
					t.Fatalf("err = %v, want %q", err, tc.errText)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("Load() = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// Load reads the environment exactly as envconfig.Process would (the server and the README use
// envconfig), for every setting that envconfig accepts.
func TestLoadAgreesWithEnvconfig(t *testing.T) {
	for _, env := range []map[string]string{
		{},
		{"EDS_SHIM_SOCKET": "/x/y.sock"},
		{"EDS_SHIM_TIMEOUT": "1500ms", "EDS_SCTP_PROXY": "/usr/sbin/docker-proxy"},
		{"EDS_SHIM_TIMEOUT": "1m0s"},
		{"EDS_SHIM_SOCKET": " spaced path ", "EDS_SHIM_TIMEOUT": "0.5s"},
	} {
		for _, k := range []string{"EDS_SHIM_SOCKET", "EDS_SHIM_TIMEOUT", "EDS_SCTP_PROXY"} {
			os.Unsetenv(k)
			t.Setenv(k, env[k])
			if _, set := env[k]; !set {
				os.Unsetenv(k)
			}
		}
		var want Config
		if err := envconfig.Process(Prefix, &want); err != nil {
			t.Fatal(err)
		}
		got, err := Load()
		if err != nil && !strings.Contains(err.Error(), "at most") {
			t.Fatalf("%v: %v", env, err)
		}
		if got != want {
			t.Errorf("%v: Load() = %+v, envconfig = %+v", env, got, want)
		}
	}
}
