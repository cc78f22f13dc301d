// Command validate strictly decodes every YAML document in the given files into the official
// Kubernetes, Istio and VPA Go types, failing on unknown fields, wrong types or unknown kinds.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	istionetapi "istio.io/api/networking/v1alpha3"
	istiosecurityapi "istio.io/api/security/v1beta1"
	istiotelemetryapi "istio.io/api/telemetry/v1alpha1"
	istionet "istio.io/client-go/pkg/apis/networking/v1"
	istiosecurity "istio.io/client-go/pkg/apis/security/v1"
	istiotelemetry "istio.io/client-go/pkg/apis/telemetry/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	vpav1 "k8s.io/autoscaler/vertical-pod-autoscaler/pkg/apis/autoscaling.k8s.io/v1"
	"sigs.k8s.io/yaml"
)

// typeMeta is read first to pick the Go type for the document.
type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

// kind builds the official type for one apiVersion/Kind. Istio's generated UnmarshalJSON accepts
// unknown fields, so for Istio kinds spec also names the proto message the spec is re-decoded into
// with protojson, which rejects unknown fields and enum values.
type kind struct {
	object func() any
	spec   func() proto.Message
}

var kinds = map[string]kind{
	"v1/Namespace":                                {object: func() any { return &corev1.Namespace{} }},
	"v1/ServiceAccount":                           {object: func() any { return &corev1.ServiceAccount{} }},
	"v1/Service":                                  {object: func() any { return &corev1.Service{} }},
	"v1/ConfigMap":                                {object: func() any { return &corev1.ConfigMap{} }},
	"v1/Secret":                                   {object: func() any { return &corev1.Secret{} }},
	"apps/v1/Deployment":                          {object: func() any { return &appsv1.Deployment{} }},
	"autoscaling/v2/HorizontalPodAutoscaler":      {object: func() any { return &autoscalingv2.HorizontalPodAutoscaler{} }},
	"policy/v1/PodDisruptionBudget":               {object: func() any { return &policyv1.PodDisruptionBudget{} }},
	"autoscaling.k8s.io/v1/VerticalPodAutoscaler": {object: func() any { return &vpav1.VerticalPodAutoscaler{} }},
	"networking.istio.io/v1/Gateway": {
		object: func() any { return &istionet.Gateway{} },
		spec:   func() proto.Message { return &istionetapi.Gateway{} },
	},
	"networking.istio.io/v1/VirtualService": {
		object: func() any { return &istionet.VirtualService{} },
		spec:   func() proto.Message { return &istionetapi.VirtualService{} },
	},
	"networking.istio.io/v1/DestinationRule": {
		object: func() any { return &istionet.DestinationRule{} },
		spec:   func() proto.Message { return &istionetapi.DestinationRule{} },
	},
	"security.istio.io/v1/PeerAuthentication": {
		object: func() any { return &istiosecurity.PeerAuthentication{} },
		spec:   func() proto.Message { return &istiosecurityapi.PeerAuthentication{} },
	},
	"security.istio.io/v1/AuthorizationPolicy": {
		object: func() any { return &istiosecurity.AuthorizationPolicy{} },
		spec:   func() proto.Message { return &istiosecurityapi.AuthorizationPolicy{} },
	},
	"telemetry.istio.io/v1/Telemetry": {
		object: func() any { return &istiotelemetry.Telemetry{} },
		spec:   func() proto.Message { return &istiotelemetryapi.Telemetry{} },
	},
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: validate FILE.yaml...")
		os.Exit(2)
	}
	failed := 0
	count := 0
	for _, path := range os.Args[1:] {
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			failed++
			continue
		}
		for i, doc := range splitDocuments(data) {
			count++
			if err := validate(doc); err != nil {
				fmt.Fprintf(os.Stderr, "%s: document %d: %v\n", path, i+1, err)
				failed++
			}
		}
	}
	if failed > 0 {
		fmt.Fprintf(os.Stderr, "%d of %d documents invalid\n", failed, count)
		os.Exit(1)
	}
	fmt.Printf("%d documents valid\n", count)
}

// splitDocuments cuts a multi-document YAML stream on "---" lines and drops empty documents.
func splitDocuments(data []byte) [][]byte {
	var docs [][]byte
	for _, part := range bytes.Split(append([]byte("\n"), data...), []byte("\n---")) {
		trimmed := strings.TrimSpace(stripComments(string(part)))
		if trimmed != "" {
			docs = append(docs, part)
		}
	}
	return docs
}

// stripComments removes full-line comments, only to tell whether a document is empty.
func stripComments(s string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(line), "#") {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

func validate(doc []byte) error {
	var meta typeMeta
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		return fmt.Errorf("not YAML: %w", err)
	}
	key := meta.APIVersion + "/" + meta.Kind
	k, ok := kinds[key]
	if !ok {
		return fmt.Errorf("unknown apiVersion/kind %q", key)
	}
	// UnmarshalStrict converts YAML to JSON and decodes with DisallowUnknownFields; duplicate
	// keys are errors too.
	if err := yaml.UnmarshalStrict(doc, k.object()); err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	if k.spec == nil {
		return nil
	}
	asJSON, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	var top map[string]json.RawMessage
	if err := json.Unmarshal(asJSON, &top); err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	spec, ok := top["spec"]
	if !ok {
		return fmt.Errorf("%s: no spec", key)
	}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(spec, k.spec()); err != nil {
		return fmt.Errorf("%s: spec: %w", key, err)
	}
	return nil
}
